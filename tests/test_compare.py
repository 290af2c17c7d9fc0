"""python -m piece_mm.eval.compare: every method through the CLI, the same lr sweep for all, summary.json in its
schema."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compare(tmp_path, *extra):
    seq = tmp_path / "two.yaml"
    seq.write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                   "world: {train_examples: 16, test_examples: 4}\ngeneral: {captions: 4, vqa: 4}\n")
    return subprocess.run([sys.executable, "-m", "piece_mm.eval.compare", "--model", "llava", "--tasks", str(seq),
                           "--output", str(tmp_path / "cmp"), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_compare_runs_every_method_and_seed(tmp_path):
    r = _compare(tmp_path, "--methods", "piece-f", "--seeds", "0,1", "--lrs", "1.0e-4,1.0e-3",
                 "--max-steps", "2", "--eval-limit", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "cmp"
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [0, 1] and set(s["methods"]) == {"piece-f"}
    for method, row in s["methods"].items():
        # the chosen lr is the one with the best OP on seed 0, and each seed's numbers are its run's
        first = {lr: json.loads((out / "runs" / f"{method}-lr{lr:g}-seed0" / "metrics.json").read_text())
                 for lr in (1e-4, 1e-3)}
        assert row["lr"] == max(first, key=lambda lr: (first[lr]["summary"]["OP"], -lr))
        runs = [json.loads((out / "runs" / f"{method}-lr{row['lr']:g}-seed{s_}" / "metrics.json").read_text())
                for s_ in (0, 1)]
        for k in ("OP", "BWT", "FWT", "caption_retention"):
            assert row[k] == [m["summary"][k] for m in runs]
        assert row["time_s"] == [m["time_s"] for m in runs] and row["peak_memory_mb"] > 0
        assert 0 < row["trainable_fraction"] < 0.05  # the default budget: 3 % of the LLM
        assert row["trainable_fraction"] == runs[0]["trainable"]["total"] / runs[0]["parameters"]
    assert len(list((out / "runs").iterdir())) == 3  # two lrs on seed 0, the chosen one on seed 1
    table = (out / "table.md").read_text()
    op = s["methods"]["piece-f"]["OP"]
    assert f"{statistics.mean(op):.3f} ± {statistics.pstdev(op):.3f}" in table
    assert (out / "retention_vs_op.png").stat().st_size > 0 and (out / "cider.png").stat().st_size > 0


def test_compare_bad_input_one_line_exit_2(tmp_path):
    r = _compare(tmp_path, "--methods", "seqft,nosuch")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "'nosuch'" in r.stderr
    r = _compare(tmp_path, "--seeds", "a,b")
    assert r.returncode == 2 and "--seeds" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_compare_lr_from_an_earlier_summary_runs_every_seed_at_that_lr(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"seeds": [0], "methods": {"piece-f": {"lr": 1.0e-3}, "seqft": {"lr": 3.0e-4}}}))
    r = _compare(tmp_path, "--methods", "piece-f", "--seeds", "0,1", "--lr-from", str(earlier),
                 "--max-steps", "2", "--eval-limit", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "cmp"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["piece-f-lr0.001-seed0", "piece-f-lr0.001-seed1"]
    row = json.loads((out / "summary.json").read_text())["methods"]["piece-f"]
    assert row["lr"] == 1.0e-3
    runs = [json.loads((out / "runs" / f"piece-f-lr0.001-seed{s_}" / "metrics.json").read_text()) for s_ in (0, 1)]
    for k in ("answer_leak", "bare_answer"):
        assert row[k] == [m["general"]["after"][-1][k] for m in runs]
    assert "answer leak" in (out / "table.md").read_text()

    r = _compare(tmp_path, "--methods", "olora", "--lr-from", str(earlier))  # not in the earlier comparison
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert str(earlier) in r.stderr and "'olora'" in r.stderr


def test_an_interrupted_run_is_resumed_not_refused(tmp_path, monkeypatch):
    """A run killed part-way leaves checkpoint.json; the comparison's next call continues it with --resume (the CLI
    refuses to start afresh over an unfinished run)."""
    import argparse

    import piece_mm.eval.compare as cmp

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output") + 1])
        (out / "metrics.json").write_text(json.dumps({"summary": {}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cmp.subprocess, "run", fake_run)
    args = argparse.Namespace(output=tmp_path, model="llava", tasks="world", max_steps=5, eval_limit=None,
                              budget="llm-only")
    for seed, interrupted in ((0, False), (1, True)):
        out = tmp_path / "runs" / f"piece-f-lr0.001-seed{seed}"
        out.mkdir(parents=True)
        if interrupted:
            (out / "checkpoint.json").write_text("{}")
        cmp.run_one(args, "piece-f", seed, 1e-3, 1)
    assert ["--resume" in c for c in calls] == [False, True]
    assert calls[0][calls[0].index("--max-steps") + 1] == "5"
    assert all(c[c.index("--budget") + 1] == "llm-only" for c in calls)  # the same budget for every run
