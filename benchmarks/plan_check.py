"""The plan (piece_mm/plan.py) against measurement: the peaks it predicts from the config alone, beside the peaks of the
real code on real weights, on the tiny models and on the benchmark's `small` preset (53 M parameters).

    python -m benchmarks.plan_check [--output benchmarks/latest] [--quick]

Measured here on CPU, in one process, with the plan's own byte counter (PeakMemory: every tensor an op creates, until
it is freed; the weights are added once). Scoring is `pm.estimate_importance` on one batch, as the continual loop calls
it (inside its checkpointing context when asked); training is one step of the method's own tuning on a mask of the
budget's size (built inside the count): `pm.sparse_optimizer`, and with the budget's distill the teacher's forward
and the KL, over the batch and, with distill.held, its held rows (distill.held.per_step more rows of the same
examples, their answers held). The planned figures trace the same model on the meta device. On a GPU,
benchmarks/gpu_check.sh puts torch.cuda.max_memory_allocated beside the plan instead."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

# (label, method, budget, gradient checkpointing)
CASES = [("piece-f, default budget", "piece-f", "default", False),
         ("piece-s, default budget", "piece-s", "default", False),
         ("piece-s, paper budget, checkpointing", "piece-s", "llava-1.5-7b", True)]
TOLERANCE = 0.15


def _world_batch(processor, held: int = 0):
    from piece_mm.batching import collate
    from piece_mm.tasks import world
    return collate(processor, world.task_set("color", "train", 16 + held, seed=3), held=held)


def _preset_batch(model, held: int = 0):
    from benchmarks.run import BATCH, fixed_batch
    from piece_mm.batching import HELD, IGNORE_INDEX
    batch = fixed_batch(model, BATCH + held)
    if held:  # the last rows held, as collate marks them
        batch[HELD] = torch.zeros_like(batch["labels"], dtype=torch.bool)
        batch[HELD][BATCH:, :-1] = batch["labels"][BATCH:, 1:] != IGNORE_INDEX
        batch["labels"][BATCH:] = IGNORE_INDEX
    return batch


def _held_rows(budget: str) -> int:
    from piece_mm.budget import held_of
    from piece_mm.select import load_budget
    h = held_of(load_budget(budget))
    return h["per_step"] if h else 0


def measure(model, batch: dict, method: str, budget: str, checkpointing: bool, scoring: dict | None = None) -> dict:
    """{"score": bytes, "train": bytes}: weights plus the most bytes alive at once in scoring (on `scoring`, default
    the batch), and in one step (on the batch)."""
    scoring = batch if scoring is None else scoring

    import piece_mm as pm
    from piece_mm.batching import ROWS, model_inputs
    from piece_mm.methods.piece import GRADIENT_SCORES
    from piece_mm.models import activation_checkpointing
    from piece_mm.plan import PeakMemory
    from piece_mm.regularise import Distillation
    from piece_mm.select import budget_arg, load_budget

    b = load_budget(budget)
    arg = budget_arg(b)
    parts = pm.split_components(model, exclude=b["exclude"], rules=b["components"])
    budgeted = {c: names if float(arg.get(c, 0)) > 0 else [] for c, names in parts.items()}
    names = [n for c in budgeted.values() for n in c]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    existing = list(model.parameters()) + list(model.buffers())
    out = {}
    with activation_checkpointing(model, checkpointing):
        if method in GRADIENT_SCORES:
            with PeakMemory(existing) as mem:
                scores = pm.estimate_importance(model, [model_inputs(scoring)], method, names=names)
            out["score"] = weights + mem.peak
        else:
            scores = pm.estimate_importance(model, [], "random", names=names)
        masks = pm.select_masks(scores, budgeted, arg)
        del scores
        model.train()
        reg = Distillation.from_budget(b)  # the budget's term, its teacher cached for the batch's rows (held too)
        if reg is not None:
            batch = {**batch, ROWS: torch.arange(len(batch["input_ids"]))}
            reg.cache = reg.cache_batches(model, [batch], len(batch["input_ids"]))
        model.train()
        opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-4)
        with PeakMemory(existing) as mem:
            got = model(**model_inputs(batch))
            loss = got.loss
            if reg is not None:
                loss = loss + (reg(model, batch, got) / reg.counts(batch).clamp_min(1)).sum()
            del got
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.close()
        model.eval()
    out["train"] = weights + mem.peak
    return out


def check(target: str, preset: str | None = None, cases=CASES) -> list[dict]:
    """Rows of {model, case, kind, planned, measured, ratio} for an alias (tiny model) or a benchmark preset."""
    from piece_mm.plan import plan

    if preset is None:
        import piece_mm as pm
        model, processor = pm.load_model(target)
        make = lambda held: _world_batch(processor, held)  # noqa: E731
        batch = make(0)
        where, image = target, None
    else:
        from benchmarks.run import IMAGE_TOKENS, build_model
        model = build_model(preset)
        make = lambda held: _preset_batch(model, held)  # noqa: E731
        batch = make(0)
        tmp = tempfile.mkdtemp()
        model.config.save_pretrained(tmp)  # the plan reads this config.json alone
        where, image = tmp, model.config.vision_config.image_size
        assert (image // model.config.vision_config.patch_size) ** 2 == IMAGE_TOKENS
    rows = []
    for label, method, budget, ckpt in cases:
        held = _held_rows(budget)
        batch = make(held)
        length = batch["input_ids"].shape[1]
        got = measure(model, batch, method, budget, ckpt, scoring=make(0))
        p = plan(where, method, budget, "float32", batch["input_ids"].shape[0] - held, length, ckpt, image)
        for kind in got:
            planned = p["peak_bytes"][kind]
            rows.append({"model": preset or target, "case": label, "kind": kind, "planned": planned,
                         "measured": got[kind], "ratio": planned / got[kind]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | case | phase | planned (MB) | measured (MB) | planned / measured |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        ok = abs(r["ratio"] - 1) <= TOLERANCE
        lines.append(f"| {r['model']} | {r['case']} | {r['kind']} | {r['planned'] / 1e6:.1f} | "
                     f"{r['measured'] / 1e6:.1f} | {r['ratio']:.3f}{'' if ok else ' **off**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plan_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=Path("benchmarks/latest"))
    ap.add_argument("--quick", action="store_true", help="the tiny models only (no small preset)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = check("llava") + check("qwen2-vl") + ([] if args.quick else check("small", preset="small"))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "plan_check.json").write_text(json.dumps(rows, indent=1))
    (args.output / "plan_check.md").write_text(table(rows))
    print(table(rows), end="")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest difference: {worst:.1%} (tolerance {TOLERANCE:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
