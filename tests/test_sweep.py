import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sweep_runs_each_setting_and_draws_the_frontier(tmp_path):
    from piece_mm.eval.sweep import settings
    grid = {"llm": [0.01, 0.1], "lr": [1e-3], "steps": [2], "seqft_lr": [1e-4]}
    assert [s["method"] for s in settings(grid)] == ["piece-f", "piece-f", "seqft"]
    (tmp_path / "grid.yaml").write_text(json.dumps({**grid, "eval_limit": 3}))
    (tmp_path / "seq.yaml").write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                                       "world: {train_examples: 8, test_examples: 4}\ngeneral: {captions: 3, vqa: 3}\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "piece_mm.eval.sweep", "--model", "llava", "--grid", str(tmp_path / "grid.yaml"),
           "--tasks", str(tmp_path / "seq.yaml"), "--output", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "sweep.json").read_text())["settings"]
    assert len(rows) == 3 and (out / "frontier.png").stat().st_size > 0 and "seqft" in (out / "table.md").read_text()
    for row in rows:  # each point is read from its own run's metrics.json
        m = json.loads((out / "runs" / row["tag"] / "metrics.json").read_text())
        assert row["caption_retention"] == m["summary"]["caption_retention"]
        assert row["own_task"] == (m["scores"][1][0] + m["scores"][2][1]) / 2
    small, big = rows[0]["trainable"], rows[1]["trainable"]
    assert 0 < small < big
    # finished settings are read back, not rerun
    mtime = (out / "runs" / rows[0]["tag"] / "metrics.json").stat().st_mtime
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and (out / "runs" / rows[0]["tag"] / "metrics.json").stat().st_mtime == mtime
    # a grid's exclude goes into every budget; a finished run made without it is refused, not read back as if it fit
    (tmp_path / "grid.yaml").write_text(json.dumps({**grid, "eval_limit": 3, "exclude": ["k_proj"]}))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "another budget" in r.stderr
    assert (out / "runs" / rows[0]["tag"] / "metrics.json").stat().st_mtime == mtime


def test_a_grid_exclude_reaches_every_budget():
    from piece_mm.eval.sweep import settings
    grid = {"llm": [0.01], "lr": [1e-3], "steps": [2], "seqft_lr": [1e-4], "exclude": ["embed_tokens", "k_proj"]}
    sparse, seqft = settings(grid)
    assert sparse["budget"]["exclude"] == ["embed_tokens", "k_proj"] and seqft["budget"] is None


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    def sweep(grid):
        (tmp_path / "grid.yaml").write_text(grid)
        return subprocess.run([sys.executable, "-m", "piece_mm.eval.sweep", "--model", "llava", "--grid",
                               str(tmp_path / "grid.yaml"), "--output", str(tmp_path / "sweep")], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    r = sweep("llm: [2.0]\nlr: [1e-3]\nsteps: [2]\n")  # YAML reads 1e-3 as a string
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "lr holds '1e-3'" in r.stderr
    r = sweep("llm: [2.0]\nlr: [1.0e-3]\nsteps: [2]\n")  # the run refuses the budget; the sweep passes it on
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "fractions.llm is 2.0" in r.stderr
    r = sweep("llm: [0.01]\nlr: [1.0e-3]\nsteps: [2]\nexclude: k_proj\n")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "exclude is 'k_proj'" in r.stderr
