"""Side-by-side speed and memory: sparse tuning against full fine-tuning, PEFT LoRA and PEFT SHiRA, and exact
per-sample Fisher against the reference code's batch-1 loop.

    python -m benchmarks.run --output benchmarks/latest [--quick]

Everything is measured in one run, on one fixed batch (16 samples of 64 tokens: 16 image tokens + 48 text, the last
16 of them the answer), on a LLaVA-architecture model built from config (`small`: ~53 M parameters; `--quick`: a toy
size for tests). Times are medians over alternating rounds (each round runs every method once, so drift on a shared
machine hits them alike). Peak memory is taken per method in a fresh subprocess: the peak resident set during three
steps, minus the process's size just before the model was built (so it holds weights, gradients, optimizer state
and activations; see child_memory).

Training step methods (each: forward, backward, update, zero_grad):
- floor:  forward + backward, gradients for the tensors the sparse method tunes, no update: the physical limit;
- fullft: AdamW on every weight;
- lora:   PEFT LoRA r=8 on the LLM's linear layers, AdamW;
- shira:  PEFT SHiRA on the same linear layers with our mask as its mask_fn, AdamW;
- sparse: pm.sparse_optimizer with the same mask, AdamW. SHiRA only takes masks of r·(in + out) weights per layer,
          so both tune r = 1's worth: 0.3 % of the small preset's LLM linear weights.
- sparse_loop: sparse as the continual loop steps it (continual._step: the loss over the answer tokens, the model's
          output kept until backward), with no regulariser: what the next four are measured against;
- sparse_teacher: sparse_loop plus the distillation term as it was computed before the cache (kept here as the
          reference): every step a teacher forward with the chosen weights put back to their start values, and the
          exact KL at T = 2 over every non-padding position;
- sparse_cached: sparse_loop plus the term as the library computes it now (pm.Distillation at the default budget's
          settings): the teacher's top-32 log-probabilities per text position, cached once, and no teacher forward;
- sparse_rows: sparse_loop on the batch with HELD_ROWS more rows (the default method's batch shape);
- sparse_held: the default method's step: sparse_cached with the default budget's held prompts, HELD_ROWS more rows
          in the batch (of the same length, their answers held, not learned; piece_mm/methods/held.py).
Besides the resident set, the loop's steps are measured in tensor bytes (tensor_peak_mb), which carry none of the
allocator's slack.
- fullft_ckpt, sparse_ckpt: fullft and sparse with transformers' gradient checkpointing (--gradient-checkpointing),
          measured for memory only.
Importance estimation on the batch's 16 samples (every weight but the token embeddings):
- loop:       Σ_n g_n² from 16 batch-1 forward + backward passes, as the reference code does;
- per_sample: pm.estimate_importance(..., per_sample=True), one batched pass;
- batched:    one batched forward + backward (Σ g² of the whole batch's gradient): the limit."""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PRESETS = {
    # vision CLIP, text Llama; image 64 / patch 16 = 16 image tokens
    "small": {"vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
              "text": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
                           num_key_value_heads=10, vocab_size=8000), "rounds": 7},
    "quick": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
              "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=512), "rounds": 2},
}
BATCH, TOKENS, IMAGE_TOKENS, ANSWER_TOKENS = 16, 64, 16, 16
HELD_ROWS = 8  # the default budget's distill.held.per_step
SHIRA_R = 1  # SHiRA takes exactly r·(in + out) weights per layer; r = 1 is the fewest it can hold (~0.3 % here)
STEP_METHODS = ("floor", "fullft", "lora", "shira", "sparse", "sparse_loop", "sparse_teacher", "sparse_cached",
                "sparse_rows", "sparse_held")
DISTILL_METHODS = ("sparse_teacher", "sparse_cached", "sparse_held")
LOOP_METHODS = ("sparse_loop", "sparse_rows") + DISTILL_METHODS  # a step of the continual loop (continual._step)
CKPT_METHODS = ("fullft_ckpt", "sparse_ckpt")  # the same steps under --gradient-checkpointing: memory only
FISHER_METHODS = ("loop", "per_sample", "batched")
LLM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_model(preset: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    p = PRESETS[preset]
    vision = CLIPVisionConfig(image_size=64, patch_size=16, **p["vision"])
    text = LlamaConfig(max_position_embeddings=128, **p["text"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=p["text"]["vocab_size"] - 1,
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def fixed_batch(model, n: int = BATCH) -> dict:
    """n samples of TOKENS tokens: the image's tokens first, then text; labels on the last ANSWER_TOKENS."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.text_config.vocab_size - 1, (n, TOKENS), generator=gen)
    ids[:, 1:1 + IMAGE_TOKENS] = cfg.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    pixels = torch.randn(n, 3, 64, 64, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}


def llm_linear_weights(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if re.fullmatch(LLM_LINEAR + r"\.weight", n)}


def make_masks(model) -> dict[str, torch.Tensor]:
    """SHIRA_R·(in + out) weights of each LLM linear layer, at random (the count, not the scores, sets the cost).
    That is the size SHiRA insists on; 0.1 % of a layer would need layers over 2 000 wide."""
    gen = torch.Generator().manual_seed(2)
    masks = {}
    for n, p in llm_linear_weights(model).items():
        k = SHIRA_R * sum(p.shape)
        masks[n] = torch.randperm(p.numel(), generator=gen)[:k].sort().values  # flat indices, int64
    return masks


def setup_step(method: str, preset: str):
    """(model, step function) for one training-step method, on its own copy of the model."""
    import piece_mm as pm

    model = build_model(preset).train()
    masks = make_masks(model)
    if method in CKPT_METHODS:  # transformers' checkpointing, as the train flag switches it on
        model.config.text_config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        method = method.removesuffix("_ckpt")
    if method == "floor":
        for n, p in model.named_parameters():
            p.requires_grad_(n in masks)
        opt = None
    elif method == "fullft":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLM_LINEAR))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif method == "shira":
        from peft import ShiraConfig, get_peft_model
        by_weight = {id(p): masks[n] for n, p in model.named_parameters() if n in masks}

        def mask_fn(base_layer, r, **_):  # our mask, as the dense 0/1 tensor SHiRA asks for
            m = torch.zeros(base_layer.weight.numel(), dtype=base_layer.weight.dtype)
            m[by_weight[id(base_layer.weight)]] = 1
            return m.view_as(base_layer.weight)

        config = ShiraConfig(r=SHIRA_R, target_modules=LLM_LINEAR)
        config.mask_fn = mask_fn
        model = get_peft_model(model, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif method == "sparse":
        opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-4)
    elif method in ("sparse",) + LOOP_METHODS:
        opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-4)
    else:
        raise KeyError(method)
    rows = BATCH + HELD_ROWS if method in ("sparse_rows", "sparse_held") else BATCH
    batch = fixed_batch(model, rows)
    if method == "sparse_held":  # the last rows held: their answers are the term's, not the loss's
        from piece_mm.batching import HELD, IGNORE_INDEX
        batch[HELD] = torch.zeros_like(batch["labels"], dtype=torch.bool)
        batch[HELD][BATCH:, :-1] = batch["labels"][BATCH:, 1:] != IGNORE_INDEX
        batch["labels"][BATCH:] = IGNORE_INDEX
    reg = None
    if method == "sparse_teacher":
        reg = _TeacherTerm(opt)
    elif method in ("sparse_cached", "sparse_held"):
        from piece_mm.batching import ROWS
        from piece_mm.regularise import Distillation
        batch[ROWS] = torch.arange(rows)
        reg = Distillation(weight=1.0, temperature=2.0, top_k=32, held_weight=3.0 if method == "sparse_held" else 0)
        reg.cache = reg.cache_batches(model, [batch], rows)  # the teacher: the model as the task begins

    def step():
        if method in LOOP_METHODS:  # the loop's own step: forward, regulariser, backward
            from piece_mm.continual import _step
            _step(model, [batch], "cpu", reg)
        else:
            model(**batch).loss.backward()
        if opt is None:
            model.zero_grad(set_to_none=True)
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def _TeacherTerm(opt):
    """The distillation term as computed before the cache, as a regulariser of the loop: each step, the teacher's
    forward (the chosen elements put back to their start values for it) and the exact KL at T = 2, summed over every
    non-padding position and counted by them."""
    from piece_mm.batching import model_inputs
    from piece_mm.regularise import Regulariser, kl_sums

    class Teacher(Regulariser):
        start = opt.chosen_values()

        def counts(self, batch):
            return batch["attention_mask"].sum().float().reshape(1)

        def __call__(self, model, batch, out):
            with torch.no_grad(), opt.holding(self.start):
                model.eval()
                try:
                    teacher = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
                finally:
                    model.train()
            return kl_sums(out.logits, teacher, batch["attention_mask"].bool(), 2.0).reshape(1)
    return Teacher()


def fisher_runners(preset: str):
    """{method: fn() -> scores} on one shared model, the batch's samples, every weight but token embeddings."""
    import piece_mm as pm

    model = build_model(preset)
    parts = pm.split_components(model)
    names = [n for c in parts.values() for n in c]
    batch = fixed_batch(model)
    singles = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(BATCH)]
    return {
        "loop": lambda: pm.estimate_importance(model, singles, "piece-f", names=names),
        "per_sample": lambda: pm.estimate_importance(model, [batch], "piece-f", names=names, per_sample=True),
        "batched": lambda: pm.estimate_importance(model, [batch], "piece-f", names=names),
    }


def max_rel_err(got: dict, ref: dict, floor: float = 1e-10) -> float:
    """Max over parameters of max|got - ref| / max|ref|, skipping parameters whose reference is rounding noise
    (below floor × the largest score: e.g. attention key biases, whose gradient is zero in exact arithmetic)."""
    top = max(r.abs().max().item() for r in ref.values())
    return max(((got[n] - r).abs().max() / r.abs().max()).item() for n, r in ref.items()
               if r.abs().max() > floor * top)


def timed_rounds(fns: dict, rounds: int) -> dict:
    for fn in fns.values():  # warm-up: allocator, PEFT's first-call work, Adam state
        fn()
    times = {m: [] for m in fns}
    for _ in range(rounds):
        for m, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t)
    return {m: statistics.median(ts) for m, ts in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) / 1024


def _method_fn(method: str, preset: str):
    return fisher_runners(preset)[method] if method in FISHER_METHODS else setup_step(method, preset)[1]


def child_memory(method: str, preset: str) -> float:
    """Peak resident memory added by one method: model, gradients, optimizer state, activations (MB).

    The method first runs once on the toy preset so that lazy imports and first-call allocations are not counted.
    Then: the resident size before the real model is built (base); build and set up (model, masks, adapters,
    optimizer); reset the kernel's peak-RSS mark (/proc/self/clear_refs), so the transients of building a model
    are not counted; three steps. The result is that peak minus base: the weights plus what training adds."""
    fn = _method_fn(method, "quick")
    fn()
    del fn
    gc.collect()
    base = _status_mb("VmRSS")
    fn = _method_fn(method, preset)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    for _ in range(3):
        fn()
    return _status_mb("VmHWM") - base


TENSOR_METHODS = LOOP_METHODS


def tensor_peak_mb(method: str, preset: str) -> float:
    """The step's peak in tensor bytes, free of the allocator's slack that the resident set carries: the weights
    and buffers, plus the most bytes of tensors alive at once that one step (after a warm-up step) creates, its
    backward included (plan.PeakMemory, which sees every op's outputs until they are freed)."""
    from piece_mm.plan import PeakMemory
    model, fn = setup_step(method, preset)
    fn()
    gc.collect()
    existing = list(model.parameters()) + list(model.buffers())
    with PeakMemory(existing) as mem:
        fn()
    return (sum(t.numel() * t.element_size() for t in existing) + mem.peak) / 2**20


def _memory_in_subprocess(method: str, preset: str) -> float:
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--child", method, "--preset", preset],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if r.returncode != 0:
        raise RuntimeError(f"memory of {method}: child failed: {r.stderr.strip().splitlines()[-1]}")
    return float(r.stdout.strip().splitlines()[-1])


def run(preset: str, rounds: int) -> dict:
    steps = {m: setup_step(m, preset) for m in STEP_METHODS}
    n_params = sum(p.numel() for p in steps["fullft"][0].parameters())
    n_tuned = sum(m.numel() for m in make_masks(steps["fullft"][0]).values())
    step_time = timed_rounds({m: fn for m, (_, fn) in steps.items()}, rounds)
    del steps
    fisher = fisher_runners(preset)
    ref, fast = fisher["loop"](), fisher["per_sample"]()
    fisher_time = timed_rounds(fisher, rounds)
    # Two children at a time: each measures its own peak resident set, which the other cannot touch.
    with ThreadPoolExecutor(max_workers=2) as pool:
        every = STEP_METHODS + CKPT_METHODS + FISHER_METHODS
        peaks = dict(zip(every, pool.map(lambda m: _memory_in_subprocess(m, preset), every)))
    mem = {m: peaks[m] for m in STEP_METHODS + CKPT_METHODS}
    tensors = {m: tensor_peak_mb(m, preset) for m in TENSOR_METHODS}
    fisher_mem = {m: peaks[m] for m in FISHER_METHODS}
    return {
        "preset": preset, "params": n_params, "tuned_weights": n_tuned, "batch": BATCH, "tokens": TOKENS,
        "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "step_time_s": step_time, "peak_mem_mb": mem, "tensor_peak_mb": tensors, "fisher_time_s": fisher_time,
        "fisher_peak_mem_mb": fisher_mem,
        "fisher_max_rel_err": max_rel_err(fast, ref),
        "ratios": {
            "sparse_vs_floor_time": step_time["sparse"] / step_time["floor"],
            "sparse_vs_shira_time": step_time["sparse"] / step_time["shira"],
            "teacher_vs_loop_time": step_time["sparse_teacher"] / step_time["sparse_loop"],
            "teacher_vs_loop_mem": mem["sparse_teacher"] / mem["sparse_loop"],
            "teacher_vs_loop_tensors": tensors["sparse_teacher"] / tensors["sparse_loop"],
            "cached_vs_loop_time": step_time["sparse_cached"] / step_time["sparse_loop"],
            "cached_vs_loop_mem": mem["sparse_cached"] / mem["sparse_loop"],
            "cached_vs_loop_tensors": tensors["sparse_cached"] / tensors["sparse_loop"],
            "held_vs_rows_time": step_time["sparse_held"] / step_time["sparse_rows"],
            "held_vs_rows_mem": mem["sparse_held"] / mem["sparse_rows"],
            "held_vs_rows_tensors": tensors["sparse_held"] / tensors["sparse_rows"],
            "sparse_vs_lora_mem": mem["sparse"] / mem["lora"],
            "sparse_vs_fullft_mem": mem["sparse"] / mem["fullft"],
            "sparse_ckpt_vs_fullft_mem": mem["sparse_ckpt"] / mem["fullft"],
            "sparse_ckpt_vs_fullft_ckpt_mem": mem["sparse_ckpt"] / mem["fullft_ckpt"],
            "loop_vs_per_sample_fisher": fisher_time["loop"] / fisher_time["per_sample"],
            "per_sample_vs_batched_fisher": fisher_time["per_sample"] / fisher_time["batched"],
        },
    }


TARGETS = {"sparse_vs_floor_time": ("<=", 1.10), "sparse_vs_shira_time": ("<=", 0.90),
           # the term as it was (a teacher forward per step): the old bounds, for reference
           "teacher_vs_loop_time": ("<=", 1.50), "teacher_vs_loop_mem": ("<=", 1.25),
           "teacher_vs_loop_tensors": ("<=", 1.25),
           # the cached term (issue "the regulariser at the cost of one pass"), against the loop's plain sparse step;
           # held rows against the loop's plain step on the same rows (the rows themselves cost what they cost)
           "cached_vs_loop_time": ("<=", 1.05), "cached_vs_loop_mem": ("<=", 1.03),
           "cached_vs_loop_tensors": ("<=", 1.03),
           "held_vs_rows_time": ("<=", 1.05), "held_vs_rows_mem": ("<=", 1.03), "held_vs_rows_tensors": ("<=", 1.03),
           "sparse_vs_lora_mem": ("<=", 1.00), "sparse_vs_fullft_mem": ("<=", 0.60),
           "sparse_ckpt_vs_fullft_mem": ("<=", 0.50), "sparse_ckpt_vs_fullft_ckpt_mem": ("<=", 0.50),
           "loop_vs_per_sample_fisher": (">=", 3.0), "per_sample_vs_batched_fisher": ("<=", 2.0)}


def table(res: dict) -> str:
    lines = [f"Preset `{res['preset']}`: {res['params'] / 1e6:.1f} M parameters, {res['tuned_weights']:,} tuned "
             f"weights (sparse / SHiRA), batch {res['batch']} × {res['tokens']} tokens, {res['threads']} threads, "
             f"median of {res['rounds']} alternating rounds, torch {res['torch']}.", "",
             "| training step | time (s) | peak memory (MB) |", "|---|---:|---:|"]
    tensors = res.get("tensor_peak_mb", {})
    lines[-2:] = ["| training step | time (s) | peak memory (MB) | peak tensors (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {res['step_time_s'][m]:.3f} | {res['peak_mem_mb'][m]:.0f} | "
              f"{tensors[m]:.0f} |" if m in tensors else
              f"| {m} | {res['step_time_s'][m]:.3f} | {res['peak_mem_mb'][m]:.0f} | — |" for m in STEP_METHODS]
    lines += [f"| {m} (gradient checkpointing) | — | {res['peak_mem_mb'][m]:.0f} | — |" for m in CKPT_METHODS]
    lines += ["", "| importance, 16 samples | time (s) | peak memory (MB) |", "|---|---:|---:|"]
    lines += [f"| {m} | {res['fisher_time_s'][m]:.3f} | {res['fisher_peak_mem_mb'][m]:.0f} |" for m in FISHER_METHODS]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|:---:|"]
    for k, (op, bound) in TARGETS.items():
        v = res["ratios"][k]
        met = v <= bound if op == "<=" else v >= bound
        lines.append(f"| {k} | {v:.3f} | {op} {bound} | {'yes' if met else '**no**'} |")
    err = res["fisher_max_rel_err"]
    lines.append(f"| fisher_max_rel_err | {err:.2e} | <= 1e-4 | {'yes' if err <= 1e-4 else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=Path("benchmarks/latest"))
    ap.add_argument("--quick", action="store_true", help="toy model and 2 rounds (a smoke test, not a result)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # memory of one method, in a fresh process
    args = ap.parse_args(argv)
    # Library chatter that says nothing about the measurement (a deprecation inside PEFT, SHiRA's sparse tensors).
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=r"Sparse invariant checks")
    preset = args.preset or ("quick" if args.quick else "small")
    if args.child:
        print(f"{child_memory(args.child, preset):.1f}")
        return 0
    rounds = PRESETS[preset]["rounds"] if args.rounds is None else args.rounds
    if rounds < 1:
        print(f"--rounds is {rounds}; expected >= 1", file=sys.stderr)
        return 2
    res = run(preset, rounds)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(res, indent=1))
    (args.output / "table.md").write_text(table(res))
    print(table(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
