"""The GPU path on a real GPU, in one command (benchmarks/gpu_check.sh): bf16 scoring, sparse steps and an evaluation
on the benchmark's `small` preset (a LLaVA architecture of 53 M parameters, built from its config: nothing is
downloaded), with the measured peaks (torch.cuda.max_memory_allocated) beside the plan's.

    bash benchmarks/gpu_check.sh            # on a machine with CUDA; about a minute
    python -m benchmarks.gpu_check --device cpu --steps 3   # the same code on CPU, every method too (tests run this)

Then every method of `--method` runs through the real loop (two tiny world tasks, the tiny LLaVA in bf16): each must
finish with bf16 weights; its measured peak (CUDA) is printed beside the plan's (`--methods none` skips this).

It also checks what the GPU path promises: the weights stay bf16, the chosen elements move (from their fp32 masters),
every other weight is bit-identical after the steps, and the loss goes down. Exit 0 when all of that holds and every
peak is within 15 % of the plan's; exit 1 otherwise, with the table."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TOLERANCE = 0.15


class _Peak:
    """The peak bytes allocated inside `with`, weights included: CUDA's own counter, or the plan's tensor counter on
    CPU (plus the weights, which it does not count)."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from piece_mm.plan import PeakMemory
            self.mem = PeakMemory(list(self.model.parameters()) + list(self.model.buffers())).__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.mem.__exit__(*exc)
            self.peak = self.mem.peak + sum(p.numel() * p.element_size() for p in self.model.parameters())
        return False


def run(device: str, preset: str, steps: int, checkpointing: bool) -> dict:
    import piece_mm as pm
    from benchmarks.run import build_model, fixed_batch
    from piece_mm.models import activation_checkpointing
    from piece_mm.plan import plan

    torch.manual_seed(0)
    model = build_model(preset).to(device=device, dtype=torch.bfloat16)
    tmp = tempfile.mkdtemp()
    model.config.save_pretrained(tmp)
    batch = {k: v.to(device) for k, v in fixed_batch(model).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    held_out = {k: v.to(device) for k, v in fixed_batch(model, 4).items()}
    held_out["pixel_values"] = held_out["pixel_values"].to(torch.bfloat16)
    parts = pm.split_components(model)
    rows, checks = [], {}
    b = pm.select.load_budget("default")
    # the steps below are plain sparse steps (the default budget's selection, without its distillation term and held
    # rows: those are measured by the loop's runs below and by benchmarks/run.py), so they are planned as such
    import yaml
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "budgets" / "default.yaml").read_text())
    raw.pop("distill", None)
    plain = Path(tmp) / "default-without-distill.yaml"
    plain.write_text(yaml.safe_dump(raw))
    planned = plan(tmp, "piece-f", str(plain), "bfloat16", batch["input_ids"].shape[0], batch["input_ids"].shape[1],
                   checkpointing, model.config.vision_config.image_size)

    t0 = time.time()
    with activation_checkpointing(model, checkpointing):
        with _Peak(model, device) as score:
            scores = pm.estimate_importance(model, [batch], "piece-f", names=parts["llm"], accumulate="device")
        rows.append(("score", planned["peak_bytes"]["score"], score.peak))
        masks = pm.select_masks(scores, {"llm": parts["llm"]}, {"llm": b["fractions"]["llm"]})
        del scores
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.train()
        with _Peak(model, device) as train:
            opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
            losses = []
            for _ in range(steps):
                loss = model(**batch).loss
                loss.backward()
                opt.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        rows.append(("train", planned["peak_bytes"]["train"], train.peak))
        opt.close()
        model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in held_out.items() if k != "labels"}
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    checks["weights stay bfloat16"] = all(p.dtype == torch.bfloat16 for p in model.parameters())
    frozen_same, chosen_moved = True, 0
    for n, p in model.named_parameters():
        flat, old = p.detach().reshape(-1), before[n].reshape(-1)
        keep = torch.ones_like(flat, dtype=torch.bool)
        if n in masks:
            idx = masks[n].to(flat.device)
            keep[idx] = False
            chosen_moved += int((flat[idx] != old[idx]).sum())
        frozen_same &= bool(torch.equal(flat[keep], old[keep]))
    checks["frozen weights bit-identical"] = frozen_same
    checks["chosen weights moved"] = chosen_moved > 0
    checks["loss went down"] = losses[-1] < losses[0]
    checks["generation ran"] = out.shape[1] > inputs["input_ids"].shape[1]
    return {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device, "preset": preset,
            "steps": steps, "gradient_checkpointing": checkpointing, "seconds": round(time.time() - t0, 1),
            "loss": [round(losses[0], 4), round(losses[-1], 4)], "chosen": sum(m.numel() for m in masks.values()),
            "peaks": [{"phase": ph, "planned": pl, "measured": me, "ratio": pl / me} for ph, pl, me in rows],
            "checks": checks}


METHODS_SEQ = ("tasks:\n  - {name: color, format: world}\n  - {name: shape, format: world}\n"
               "world: {train_examples: 16, test_examples: 4}\ngeneral: {captions: 4, vqa: 4}\n")


def run_methods(device: str, steps: int, methods: list[str]) -> list[dict]:
    """Every method of `--method` through the real loop (piece_mm.train.execute): the tiny LLaVA in bf16 on `device`,
    two world tasks of `steps` steps, batch 8. Per method: whether it finished, whether the weights stayed bf16, its
    measured peak (CUDA's counter; none on the CPU) and the plan's training peak for the same model, method and batch
    (piece_mm.plan, which plans every method)."""
    from piece_mm.plan import PLANNED, plan
    from piece_mm.runconfig import RunConfig
    from piece_mm.train import execute

    tmp = Path(tempfile.mkdtemp())
    seq = tmp / "two-tasks.yaml"
    seq.write_text(METHODS_SEQ)
    rows = []
    for m in methods:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, error = time.time(), None
        try:
            metrics = execute(RunConfig(model="llava", method=m, tasks=str(seq), device=device, dtype="bfloat16",
                                        steps=steps, batch_size=8, eval_limit=2, output=tmp / m, checkpoint_every=0))
        except Exception as e:  # noqa: BLE001 - the table says which method failed and how
            metrics, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        measured = torch.cuda.max_memory_allocated() if cuda else None
        planned = plan("llava", m, "default", "bfloat16", 8)["peak_bytes"]["train"] if m in PLANNED else None
        bf16 = None
        if metrics is not None:
            from safetensors import safe_open
            with safe_open(str(next((tmp / m / "model").glob("*.safetensors"))), "pt") as f:
                bf16 = all(f.get_slice(k).get_dtype() in ("BF16", "I64", "BOOL") for k in f.keys())
        rows.append({"method": m, "ok": metrics is not None, "error": error, "weights_bf16": bf16,
                     "seconds": round(time.time() - t0, 1), "measured": measured, "planned": planned})
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' directories (a model each): what is kept is the table
    return rows


def report_methods(rows: list[dict]) -> str:
    lines = ["", "every method, through the loop (tiny LLaVA, bf16, 2 tasks):", "",
             f"{'method':<15} {'result':<8} {'bf16':<5} {'planned':>12} {'measured':>12} {'ratio':>7} {'s':>6}"]
    for r in rows:
        pl = f"{r['planned'] / 1e6:9.1f} MB" if r["planned"] else f"{'-':>12}"
        me = f"{r['measured'] / 1e6:9.1f} MB" if r["measured"] else f"{'-':>12}"
        ratio = f"{r['planned'] / r['measured']:7.2f}" if r["planned"] and r["measured"] else f"{'-':>7}"
        lines.append(f"{r['method']:<15} {'ok' if r['ok'] else 'FAIL':<8} {str(r['weights_bf16']):<5} {pl} {me} "
                     f"{ratio} {r['seconds']:6.1f}" + (f"  {r['error']}" if r["error"] else ""))
    lines.append("(measured: torch.cuda.max_memory_allocated over the whole run, evaluation included; '-' on the CPU)")
    return "\n".join(lines)


def report(res: dict) -> str:
    lines = [f"gpu_check on {res['device']} ({res['preset']} preset, bf16, {res['chosen']:,} chosen weights, "
             f"{res['steps']} steps, {res['seconds']} s; loss {res['loss'][0]} -> {res['loss'][1]})", "",
             f"{'phase':<8} {'planned':>12} {'measured':>12} {'planned/measured':>17}"]
    for r in res["peaks"]:
        flag = "" if abs(r["ratio"] - 1) <= TOLERANCE else "  OFF"
        lines.append(f"{r['phase']:<8} {r['planned'] / 1e6:>9.1f} MB {r['measured'] / 1e6:>9.1f} MB "
                     f"{r['ratio']:>17.3f}{flag}")
    lines.append("")
    lines += [f"{'ok ' if v else 'FAIL'} {k}" for k, v in res["checks"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu runs the same code as a check")
    ap.add_argument("--preset", default="small", choices=["small", "quick"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--methods", default="all",
                    help="the methods to run through the loop after the sparse check: all (default), none, or a "
                         "comma-separated list")
    ap.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device}: no CUDA device here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if args.steps < 2:
        print(f"gpu_check: --steps {args.steps}: expected at least 2", file=sys.stderr)
        return 2
    from piece_mm.continual import METHODS
    methods = sorted(METHODS) if args.methods == "all" else [] if args.methods == "none" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"gpu_check: --methods: {unknown[0]!r} is not a method; known: {', '.join(sorted(METHODS))}",
              file=sys.stderr)
        return 2
    res = run(args.device, args.preset, args.steps, args.gradient_checkpointing)
    print(report(res))
    res["methods"] = run_methods(args.device, args.steps, methods)
    if methods:
        print(report_methods(res["methods"]))
    if args.output:
        args.output.write_text(json.dumps(res, indent=1))
    ok = all(res["checks"].values()) and all(abs(r["ratio"] - 1) <= TOLERANCE for r in res["peaks"]) and \
        all(r["ok"] and r["weights_bf16"] for r in res["methods"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
