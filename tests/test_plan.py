"""python -m piece_mm.plan: counts by hand, peaks against measurement, the JSON contract and its errors."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.plan_check import TOLERANCE, check
from piece_mm.plan import PeakMemory, main, plan

ROOT = Path(__file__).resolve().parent.parent
LLAVA_7B = ROOT / "configs" / "hf" / "llava-1.5-7b-hf"


def _llava_7b_by_hand() -> dict:
    """LLaVA-1.5-7B from its architecture: CLIP ViT-L/14 at 336 px, a two-layer GELU projector, Vicuna-7B (Llama)."""
    d, f, L, vocab = 4096, 11008, 32, 32064
    llm = vocab * d + L * (4 * d * d + 3 * d * f + 2 * d) + d + vocab * d  # embeddings, blocks, final norm, lm_head
    dv, fv, Lv, patches = 1024, 4096, 24, (336 // 14) ** 2
    vision = (3 * 14 * 14 * dv + dv + (patches + 1) * dv + 2 * dv  # patch conv, class, positions, pre-norm
              + Lv * (4 * (dv * dv + dv) + (dv * fv + fv) + (fv * dv + dv) + 4 * dv) + 2 * dv)  # blocks, post-norm
    projector = (dv * d + d) + (d * d + d)
    # the paper budget leaves out every name with "embed": token embeddings, and CLIP's patch, class and positions
    embed = vocab * d + 3 * 14 * 14 * dv + dv + (patches + 1) * dv
    return {"llm": llm, "vision": vision, "projector": projector, "embed": embed}


@pytest.mark.slow
def test_plan_of_llava_7b_from_its_config_alone(tmp_path):
    """A directory with nothing but config.json: the plan runs in seconds on CPU, its counts are the hand count, and
    its JSON has the contract's keys."""
    (tmp_path / "config.json").write_text((LLAVA_7B / "config.json").read_text())
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "piece_mm.plan", "--model", str(tmp_path), "--budget", "llava-1.5-7b",
                        "--gradient-checkpointing", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert took < 30, took
    p = json.loads(r.stdout)
    hand = _llava_7b_by_hand()
    comps = p["components"]
    for c in ("vision", "projector", "llm"):
        assert comps[c]["parameters"] == hand[c], c
        assert set(comps[c]) == {"parameters", "eligible", "selected"}
    assert p["total"]["parameters"] == hand["llm"] + hand["vision"] + hand["projector"] == 7_063_427_072
    assert sum(comps[c]["parameters"] - comps[c]["eligible"] for c in comps) == hand["embed"]
    for c in comps:  # 0.1 % of each component's eligible weights
        assert comps[c]["selected"] == int(0.001 * comps[c]["eligible"])
    assert set(p["peak_bytes"]) == {"score", "train"} and p["peak_bytes"]["score"] > p["peak_bytes"]["train"] > 0
    w = p["bytes"]["weights"]
    assert w == 2 * hand["llm"] + 2 * hand["vision"] + 2 * hand["projector"]  # bf16
    assert p["bytes"]["score_sums"] == 4 * p["total"]["eligible"]  # PIECE-F: one fp32 sum per scored weight


@pytest.mark.parametrize("alias", ["llava", "qwen2-vl"])
def test_planned_peaks_agree_with_measured_peaks(alias):
    """Scoring and one training step of the real code on the tiny models, counted tensor by tensor, against the
    plan's meta-device trace (benchmarks/plan_check.py adds the 53 M `small` preset)."""
    rows = check(alias)
    assert len(rows) == 6
    for r in rows:
        assert abs(r["ratio"] - 1) <= TOLERANCE, r


def test_checkpointing_and_batch_move_the_plan_as_they_should(tmp_path):
    base = plan("llava", dtype="float32")
    ckpt = plan("llava", dtype="float32", gradient_checkpointing=True)
    small = plan("llava", dtype="float32", batch_size=4)
    assert ckpt["bytes"]["activations_train"] < base["bytes"]["activations_train"]
    assert small["bytes"]["activations_train"] < base["bytes"]["activations_train"]
    assert small["bytes"]["score_sums"] == base["bytes"]["score_sums"]
    s = plan("llava", method="piece-s", dtype="float32")
    assert s["bytes"]["score_sums"] == 2 * base["bytes"]["score_sums"]
    full = plan("llava", method="seqft", dtype="float32")
    assert full["bytes"]["optimizer_state"] == 2 * full["bytes"]["weights"]  # AdamW's two moments
    plain = plan("llava", budget="llm-only", dtype="float32")  # no distillation: the sparse step alone
    assert full["peak_bytes"]["train"] > plain["peak_bytes"]["train"]
    # the held prompts' rows join each step's batch: the default's training trace is that of 16 + per_step rows
    import yaml
    raw = yaml.safe_load((ROOT / "configs" / "budgets" / "default.yaml").read_text())
    raw["distill"]["held"]["weight"] = 0.0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    no_held = plan("llava", budget=str(tmp_path / "b.yaml"), dtype="float32")
    wider = plan("llava", budget=str(tmp_path / "b.yaml"), dtype="float32", batch_size=16 + base["held_rows"])
    assert base["held_rows"] == 8 and no_held["held_rows"] == 0
    assert base["bytes"]["activations_train"] == wider["bytes"]["activations_train"]
    assert base["bytes"]["activations_train"] > no_held["bytes"]["activations_train"]


@pytest.mark.slow
def test_fsdp_plan_is_per_process():
    """FSDP2 over N: 1/N of the weights, score sums and optimizer state plus the gathered blocks, and each process's
    share of the batch; the 72B config fits 8 x 80 GB only sharded."""
    from piece_mm.plan import _gathered, load_config, meta_model
    one = plan("llava", dtype="float32")
    two = plan("llava", dtype="float32", num_processes=2, fsdp=True)
    gathered = _gathered(meta_model(load_config("llava"), torch.float32)) * 4
    assert two["bytes"]["gathered_block"] == gathered and 0 < gathered < one["bytes"]["weights"]
    assert two["bytes"]["weights"] == -(-one["bytes"]["weights"] // 2) + gathered
    assert two["bytes"]["score_sums"] == -(-one["bytes"]["score_sums"] // 2)
    assert two["bytes"]["optimizer_state"] == -(-one["bytes"]["optimizer_state"] // 2)
    assert two["batch_per_process"] == 8 and two["batch_size"] == 16 and two["processes"] == 2
    big = ROOT / "configs" / "hf" / "qwen2-vl-72b-instruct"
    whole = plan(str(big), gradient_checkpointing=True)
    shards = plan(str(big), num_processes=8, fsdp=True, gradient_checkpointing=True)
    assert whole["total"]["parameters"] == 73_405_560_320  # Qwen2-VL-72B's published 73.4 B
    assert whole["peak_bytes"]["train"] > 80e9 > shards["peak_bytes"]["train"]
    assert shards["peak_bytes"]["score"] < 80e9


def test_peak_memory_counts_what_is_alive():
    """The counter against arithmetic: 40 MB then 20 MB alive gives a peak of 40 MB; views of weights are free."""
    w = torch.zeros(1000, 1000)
    with PeakMemory([w]) as m:
        a = torch.empty(10_000_000)
        del a
        b = torch.empty(5_000_000)
        wt = w.t()
    assert m.peak == 40_000_000 and m.now == 20_000_000
    del b, wt


@pytest.mark.parametrize("argv, words", [
    (["--model", "llava", "--method", "lora"], ["--method 'lora'", "piece-f"]),
    (["--model", "/no/such/dir"], ["/no/such/dir"]),
    (["--model", "llava", "--budget", "nope"], ["--budget 'nope'"]),
    (["--model", "llava", "--max-length", "10"], ["--max-length 10", "64 image tokens"]),
    (["--model", "llava", "--batch-size", "0"], ["--batch-size 0"]),
    (["--model", "llava", "--fsdp"], ["--num-processes 1", "2 or more"]),
    (["--model", "llava", "--fsdp", "--num-processes", "2", "--method", "seqft"], ["--fsdp", "sparse"]),
    (["--model", "llava", "--num-processes", "32"], ["--batch-size 16", "--num-processes 32"]),
])
def test_plan_errors_are_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert all(w in err for w in words), err


def test_auto_pool_plans_as_the_global_pool(tmp_path):
    """pool: auto splits the same total as the global pool, known only after scoring: the same count, the same score
    sums (every component scored) and the same peaks."""
    import yaml
    auto = tmp_path / "auto.yaml"
    auto.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/budgets/paper-global.yaml").read_text()),
                                    "pool": "auto"}))
    g, a = plan("llava", budget="paper-global", dtype="float32"), plan("llava", budget=str(auto), dtype="float32")
    assert a["total"]["selected"] == g["total"]["selected"] == int(0.001 * g["total"]["eligible"])
    assert all(v["selected"] is None for v in a["components"].values())
    assert a["bytes"] == g["bytes"] and a["peak_bytes"] == g["peak_bytes"]



def test_dense_methods_plan_their_masters_and_state():
    """bf16 full fine-tuning keeps an fp32 master and two fp32 moments per weight (piece_mm/optim.py); EWC adds an
    fp32 Fisher and anchor per weight, LwF a copy of the weights; ln tunes only the norms."""
    seqft = plan("llava", method="seqft", dtype="bfloat16")
    n = seqft["total"]["parameters"]
    assert seqft["bytes"]["weights"] == 2 * n and seqft["bytes"]["optimizer_state"] == 12 * n
    ewc, lwf = plan("llava", method="ewc", dtype="bfloat16"), plan("llava", method="lwf", dtype="bfloat16")
    assert ewc["bytes"]["method_state"] == 8 * n and lwf["bytes"]["method_state"] == 2 * n
    assert ewc["peak_bytes"]["train"] - seqft["peak_bytes"]["train"] == 8 * n
    assert lwf["bytes"]["activations_train"] > seqft["bytes"]["activations_train"]  # the teacher's forward and KL
    ln = plan("llava", method="ln", dtype="bfloat16")
    import torch

    from piece_mm.methods.ln import norm_params
    from piece_mm.plan import load_config, meta_model
    m = meta_model(load_config("llava"), torch.bfloat16)
    named = dict(m.named_parameters())
    assert ln["total"]["selected"] == sum(named[k].numel() for k in norm_params(m)) < n // 50


def test_lora_and_trace_plans():
    """SeqLoRA / O-LoRA: rank x (in + out) fp32 adapter weights per LLM linear layer (lm_head left out), 16 bytes each
    with gradient and moments. TRACE: its probe fine-tunes every scored weight densely before the Σ g² pass, so its
    scoring peak is above PIECE-F's, and it trains the same sparse step."""
    import torch

    from piece_mm.methods import load_settings
    from piece_mm.plan import load_config, meta_model
    lora = plan("llava", method="seqlora", dtype="bfloat16")
    m = meta_model(load_config("llava"), torch.bfloat16)
    r = load_settings("seqlora")["rank"]
    by_hand = sum(r * (mod.in_features + mod.out_features) for n, mod in m.named_modules()
                  if isinstance(mod, torch.nn.Linear) and "language_model" in n and not n.endswith("lm_head"))
    assert lora["total"]["selected"] == by_hand > 0
    assert lora["bytes"]["optimizer_state"] == 8 * by_hand and lora["bytes"]["gradients"] == 4 * by_hand
    trace, piece = plan("llava", method="trace", dtype="bfloat16"), plan("llava", method="piece-f", dtype="bfloat16")
    assert trace["peak_bytes"]["score"] > piece["peak_bytes"]["score"]
    assert trace["peak_bytes"]["train"] == piece["peak_bytes"]["train"]


def test_time_estimate_is_flops_over_rate():
    """The plan's time per task: 6 FLOPs per weight per token (8 with checkpointing) over examples x epochs x tokens,
    with the held rows and the teacher cache's forwards (one per example) with distillation, at the given sustained
    rate."""
    from piece_mm.plan import compute
    p = plan("llava", budget="llm-only", dtype="bfloat16", batch_size=8, max_length=100)
    c = compute(p, 1000, 5, 100, 1000)
    n = p["total"]["parameters"]
    assert c["train_flops"] == 1000 * 5 * 100 * n * 6
    assert c["train_minutes"] == pytest.approx(c["train_flops"] / 100e12 / 60)
    assert c["score_flops"] == 1000 * 100 * n * 6
    d = plan("llava", dtype="bfloat16", batch_size=8, max_length=100, gradient_checkpointing=True)  # distill + held
    cd = compute(d, 1000, 5, 100)
    # no teacher forward per step: the held rows widen the batch, and the cache costs one forward per example and
    # held row before the task
    assert cd["train_flops"] == pytest.approx(1000 * 5 * 100 * n * 8 * (1 + d["held_rows"] / 8))
    assert cd["score_flops"] == pytest.approx((1000 + 256) * 100 * n * 2)
    two = compute(plan("llava", budget="llm-only", dtype="bfloat16", batch_size=8, max_length=100,
                       num_processes=2), 1000, 5, 100)
    assert two["train_minutes"] == pytest.approx(c["train_minutes"] / 2)


def test_the_plan_counts_the_teacher_cache_and_no_teacher_forward(tmp_path):
    """The cached term (regularise.Distillation): the plan's cache is (examples + held pool) x positions x (8 k + 4)
    + 8 bytes, at the text positions (the image's tokens left out); LLaVA-1.5-7B's training peak at the settings the
    issue measured (bf16, batch 16, checkpointing, the default's 3 %, the term on the task's rows) stays within 27 GB
    and within 1 GB of the same plan without the term."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "budgets" / "default.yaml").read_text())
    raw["distill"]["held"]["weight"] = 0.0
    (tmp_path / "term.yaml").write_text(yaml.safe_dump(raw))
    del raw["distill"]
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(raw))
    seven = ROOT / "configs" / "hf" / "llava-1.5-7b-hf"
    term, none = (plan(str(seven), budget=str(tmp_path / f"{b}.yaml"), gradient_checkpointing=True)
                  for b in ("term", "none"))
    assert term["peak_bytes"]["train"] <= 27e9 and term["peak_bytes"]["train"] - none["peak_bytes"]["train"] <= 1e9
    assert term["bytes"]["optimizer_state"] == none["bytes"]["optimizer_state"]  # no start values kept
    c = term["teacher_cache"]
    assert c["top_k"] == 32 and c["positions_per_example"] == term["max_length"] - term["image"]["tokens"]
    assert c["bytes_per_example"] == c["positions_per_example"] * (8 * 32 + 4) + 8
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()) as f:
        assert main(["--model", str(seven), "--examples", "1000", "--json"]) == 0
    p = json.loads(f.getvalue())
    assert p["host_bytes"]["teacher_cache"] == (1000 + 256) * p["teacher_cache"]["bytes_per_example"]
