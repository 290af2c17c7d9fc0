import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _main(module: str, *args) -> int:
    """The CLI's main in this process (its error paths stop before any model loads): the exit code."""
    import importlib
    try:
        return importlib.import_module(module).main(list(args))
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_unknown_model_one_line_exit_2(tmp_path, capsys):
    assert _main("piece_mm.train", "--model", "no-such-model", "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no-such-model" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_missing_sequence_and_bad_flag(tmp_path, capsys):
    assert _main("piece_mm.train", "--tasks", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and err.strip().count("\n") == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: color, format: world}\nworld: {train_examples: -3}\n")
    assert _main("piece_mm.train", "--tasks", str(bad), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "world.train_examples" in err and "-3" in err
    assert _main("piece_mm.train", "--max-steps", "0", "--output", str(tmp_path / "o")) == 2
    assert "--max-steps" in capsys.readouterr().err


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    assert _main("piece_mm.train", "--output", str(out)) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == '{"keep": true}'


TWO_TASKS = ("tasks:\n  - {name: color, format: world}\n  - {name: shape, format: world}\n"
             "world: {train_examples: 16, test_examples: 8}\ngeneral: {captions: 6, vqa: 6}\n")


@pytest.mark.slow
def test_short_run_writes_metrics_in_the_schema(tmp_path):
    import math

    import torch

    import piece_mm as pm

    seq = tmp_path / "two.yaml"
    seq.write_text(TWO_TASKS)
    out = tmp_path / "run"
    r = _run("piece_mm.train", "--model", "qwen2-vl", "--tasks", str(seq), "--max-steps", "2", "--batch-size", "4",
             "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert {"model", "method", "seed", "tasks", "scores", "general", "summary", "trainable", "time_s"} <= set(m)
    assert m["model"] == "qwen2-vl" and m["method"] == "piece-f" and m["seed"] == 0  # piece-f is the default
    assert m["tasks"] == ["color", "shape"]
    assert len(m["scores"]) == 3 and all(len(row) == 2 for row in m["scores"])
    assert all(0.0 <= v <= 1.0 for row in m["scores"] for v in row)
    keys = {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "VQA"}
    assert keys <= set(m["general"]["before"]) and len(m["general"]["after"]) == 2
    assert all(keys <= set(a) for a in m["general"]["after"])
    for g in [m["general"]["before"]] + m["general"]["after"]:  # shares of captions ("three" may be a bare answer
        assert 0.0 <= g["answer_leak"] <= 1.0 and 0.0 <= g["bare_answer"] <= 1.0  # that is also a caption word)
    assert set(m["summary"]) == {"OP", "BWT", "FWT", "caption_retention", "caption_retention_unseen",
                                 "vqa_retention", "vqa_retention_unseen"}
    from piece_mm.tasks import world
    b, a = m["general"]["before"], m["general"]["after"][-1]  # the unseen prompts' retention, from their CIDEr
    assert set(b["unseen_prompts"]) == set(world.UNSEEN_CAPTION_PROMPTS)
    assert m["summary"]["caption_retention_unseen"] == pytest.approx(sum(
        a["unseen_prompts"][p]["CIDEr"] / b["unseen_prompts"][p]["CIDEr"] for p in b["unseen_prompts"]) / 3)
    assert m["summary"]["vqa_retention"] == pytest.approx(a["VQA"] / b["VQA"])
    R = m["scores"]
    assert m["summary"]["OP"] == pytest.approx(sum(R[2]) / 2)
    assert m["summary"]["caption_retention"] == pytest.approx(
        m["general"]["after"][-1]["CIDEr"] / m["general"]["before"]["CIDEr"])

    # trainable = the chosen weights per component: exactly k = floor(fraction x scorable elements)
    from piece_mm.select import load_budget
    base, _ = pm.load_model("qwen2-vl")
    budget = load_budget("default")
    parts = pm.split_components(base, exclude=budget["exclude"])  # the budget's exclusions (the LLM's keys too)
    params = dict(base.named_parameters())
    fr = budget["fractions"]
    for c in ("vision", "projector", "llm"):
        n = sum(params[x].numel() for x in parts[c])
        assert m["trainable"][c] == (max(1, math.floor(fr[c] * n)) if fr[c] > 0 else 0), c
    t = m["trainable"]
    assert t["total"] == t["vision"] + t["projector"] + t["llm"] > 0
    assert [s["task"] for s in m["selection"]] == ["color", "shape"] and len(m["mask_jaccard"]) == 2
    for f in ("report.md", "score_matrix.png", "cider.png", "selection.png", "model/config.json",
              "masks/1-color.safetensors", "masks/2-shape.safetensors", "deltas/2-shape.safetensors"):
        assert (out / f).is_file(), f
    assert "Chosen weights" in (out / "report.md").read_text()
    # the base model plus the task deltas, in order, is the tuned model, bit for bit
    for i, task in enumerate(m["tasks"]):
        pm.apply_delta(base, pm.load_delta(out / "deltas" / f"{i + 1}-{task}.safetensors"))
    tuned, _ = pm.load_model(str(out / "model"))
    assert all(torch.equal(p, q) for p, q in zip(base.state_dict().values(), tuned.state_dict().values()))
    # the saved final model is a checkpoint the standalone retention check can read
    r = _run("piece_mm.experiments.captioning", "--model", str(out / "model"), "--baseline", "qwen2-vl",
             "--eval-limit", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CIDEr" in r.stdout and "retention" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--method", "seqft"], ["--budget", "paper-global"], ["--method", "piece-s"],
                                   ["--method", "trace", "--budget", "trace-tensor"]])
def test_other_methods_and_budgets_run_end_to_end(tmp_path, extra):
    seq = tmp_path / "two.yaml"
    seq.write_text(TWO_TASKS)
    out = tmp_path / "run"
    r = _run("piece_mm.train", "--model", "llava", "--tasks", str(seq), "--max-steps", "2", "--batch-size", "4",
             "--eval-limit", "4", "--output", str(out), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    t = m["trainable"]
    if extra[1] == "seqft":
        assert min(t["vision"], t["projector"], t["llm"]) > 0 and "selection" not in m
    elif extra[1] == "paper-global":
        import piece_mm as pm
        base, _ = pm.load_model("llava")
        n = sum(p.numel() for name, p in base.named_parameters() if "embed" not in name)
        assert t["total"] == int(0.001 * n)
    elif extra[1] == "trace":  # whole tensors, at most 10 % of the LLM; the task x task cosine of the probes
        from safetensors.torch import load_file
        masks = load_file(str(out / "masks" / "1-color.safetensors"))
        import piece_mm as pm
        params = dict(pm.load_model("llava")[0].named_parameters())
        assert masks and all(v.numel() == params[n].numel() for n, v in masks.items())
        C = m["trace_cosine"]
        assert len(C) == 2 and C[0][0] == pytest.approx(1.0) and C[0][1] == pytest.approx(C[1][0])
        assert "TRACE" in (out / "report.md").read_text() and (out / "trace" / "2-shape.safetensors").is_file()
    else:
        assert m["method"] == "piece-s" and t["llm"] > 0


def test_bad_budget_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "b.yaml"
    bad.write_text("fractions: {vision: 0.0, llm: -0.5}\n")
    assert _main("piece_mm.train", "--budget", str(bad), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "fractions.llm" in err and "-0.5" in err
    assert err.strip().count("\n") == 0 and not (tmp_path / "o").exists()


def test_captioning_cli_bad_data_exit_2(tmp_path, capsys):
    bad = tmp_path / "caps.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "caption": "x"}]}')
    assert _main("piece_mm.experiments.captioning", "--model", "llava", "--data", str(bad),
                 "--images", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "image_id" in err and err.strip().count("\n") == 0
    assert _main("piece_mm.experiments.captioning", "--model", "llava", "--eval-limit", "0") == 2
    err = capsys.readouterr().err
    assert "--eval-limit" in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_per_sample_budget_scores_like_the_batch_1_loop(tmp_path):
    """score_batch_size: 1 runs the exact batched per-sample path; task 1's mask equals the one chosen from
    batch-1-loop scores of the same base model on the same examples."""
    import piece_mm as pm
    from piece_mm.batching import collate
    from piece_mm.delta import load_masks
    from piece_mm.tasks.sequence import load_sequence

    seq = tmp_path / "two.yaml"
    seq.write_text(TWO_TASKS)
    budget = tmp_path / "ps.yaml"
    budget.write_text("fractions: {vision: 0.01, projector: 0.01, llm: 0.01}\nscore_examples: 12\n"
                      "score_batch_size: 1\n")
    out = tmp_path / "run"
    r = _run("piece_mm.train", "--model", "llava", "--tasks", str(seq), "--max-steps", "2", "--batch-size", "4",
             "--eval-limit", "4", "--output", str(out), "--budget", str(budget))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch-1 loop" not in r.stderr  # every parameter covered by the batched rules
    model, processor = pm.load_model("llava")
    task = load_sequence(seq).tasks[0]
    parts = pm.split_components(model)
    names = [n for c in parts.values() for n in c]
    scores = pm.estimate_importance(model, [collate(processor, [e]) for e in task.train[:12]], "piece-f", names=names)
    expect = pm.select_masks(scores, parts, {"vision": 0.01, "projector": 0.01, "llm": 0.01})
    got = load_masks(next((out / "masks").glob("1-*.safetensors")))
    shared = sum(len(set(got[n].tolist()) & set(expect[n].tolist())) for n in expect)
    assert shared >= 0.99 * sum(len(v) for v in expect.values())


# In-process error paths (issue 19): each ends in well under 10 s, with exit 2 and one line, before any loading.
@pytest.mark.parametrize("device, says", [("cuda", "no CUDA device"), ("bogus", "not a torch device"),
                                          ("cuda:7", "CUDA")])
def test_a_device_that_cannot_be_had_is_one_line_before_loading(tmp_path, capsys, device, says, monkeypatch):
    import time

    import torch

    from piece_mm import models
    from piece_mm.train import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    t = time.time()
    assert main(["--device", device, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - t < 10 and err.count("\n") == 0 and says in err and repr(device) in err
    assert not (tmp_path / "o").exists()


def test_auto_device_and_dtype_defaults(monkeypatch):
    import torch

    from piece_mm.train import resolve_device, resolve_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(None, "cuda") is torch.bfloat16 and resolve_dtype("auto", "cuda") == "auto"


def test_an_uncached_hf_id_fails_at_once_saying_how_to_use_a_local_dir(tmp_path, capsys, monkeypatch):
    import time

    from piece_mm.train import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    assert main(["--model", "nobody/not-a-cached-model", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - t < 10 and err.count("\n") == 0
    assert "not in the local Hugging Face cache" in err and "--model DIR" in err


def test_a_task_answer_the_tokenizer_cannot_spell_stops_the_run(tmp_path, capsys):
    import time

    from piece_mm.tasks import world
    from piece_mm.train import main
    img = tmp_path / "a.png"
    world.scenes(1, 1)[0].image().save(img)
    rows = [{"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat animal is it"},
        {"from": "gpt", "value": "a zebra" if i == 2 else "a circle"}]} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    seq = tmp_path / "s.yaml"
    seq.write_text("tasks:\n  - name: animals\n    format: llava-json\n    train: {data: d.json, images: .}\n"
                   "    test: {data: d.json, images: .}\ngeneral: {captions: 4, vqa: 4}\n")
    t = time.time()
    assert main(["--tasks", str(seq), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - t < 30 and err.count("\n") == 0
    assert "'animals' train example 2" in err and "'zebra'" in err and "--allow-unknown-tokens" in err
    assert not (tmp_path / "o").exists()


def test_every_flag_has_help_and_known_choices_are_listed():
    from piece_mm.train import build_parser
    ap = build_parser()
    for action in ap._actions:
        assert action.help, action.option_strings
    text = ap.format_help()
    for name in ("default", "paper-global", "llava-1.5-7b", "world", "world-reversed", "piece-f", "seqft",
                 "qwen2-vl", "--corenlp"):
        assert name in text, name


@pytest.mark.slow
def test_eval_general_last_scores_the_general_set_at_the_end_only_and_changes_no_number(uninterrupted_run, tmp_path):
    """--eval-general last: the same run (one thread, the same seed) with the general set scored before the first task
    and after the last only: every task score and every summary number are the full run's, the stages between have
    no general scores, and the report and its CIDEr figure are still written."""
    import os

    from conftest import short_run_args
    seq, whole = uninterrupted_run
    out = tmp_path / "last"
    r = subprocess.run(short_run_args(seq, out, "--eval-general", "last"), capture_output=True, text=True,
                       timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, out))
    assert b["scores"] == a["scores"] and b["summary"] == a["summary"]
    assert b["general"]["before"] == a["general"]["before"] and b["general"]["after"][-1] == a["general"]["after"][-1]
    assert all(g == {} for g in b["general"]["after"][:-1]) and len(b["general"]["after"]) == len(a["general"]["after"])
    assert b["eval_general"] == "last" and "eval_general" not in a
    assert (out / "cider.png").is_file() and "General ability" in (out / "report.md").read_text()
