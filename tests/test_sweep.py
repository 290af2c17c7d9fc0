"""piece_mm.experiments.sweep: one run per setting of a grid, in-process (each run in a process of its own)."""
import json

import pytest

from piece_mm.experiments import sweep as sweep_mod


@pytest.mark.slow
def test_sweep_runs_each_setting_and_draws_the_frontier(tmp_path, capsys):
    from piece_mm.experiments.sweep import settings
    grid = {"llm": [0.01, 0.1], "lr": [1e-3], "steps": [2], "seqft_lr": [1e-4]}
    assert [s["method"] for s in settings(grid)] == ["piece-f", "piece-f", "seqft"]
    (tmp_path / "grid.yaml").write_text(json.dumps({**grid, "eval_limit": 3}))
    (tmp_path / "seq.yaml").write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                                       "world: {train_examples: 8, test_examples: 4}\ngeneral: {captions: 3, vqa: 3}\n")
    out = tmp_path / "sweep"
    argv = ["--model", "llava", "--grid", str(tmp_path / "grid.yaml"), "--tasks", str(tmp_path / "seq.yaml"),
            "--output", str(out)]
    assert sweep_mod.main(argv) == 0
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
    assert sweep_mod.main(argv) == 0 and (out / "runs" / rows[0]["tag"] / "metrics.json").stat().st_mtime == mtime
    # a grid's exclude goes into every budget; a finished run made without it is refused, not read back as if it fit
    (tmp_path / "grid.yaml").write_text(json.dumps({**grid, "eval_limit": 3, "exclude": ["k_proj"]}))
    capsys.readouterr()
    assert sweep_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "another budget" in err
    assert (out / "runs" / rows[0]["tag"] / "metrics.json").stat().st_mtime == mtime


def test_a_grid_exclude_reaches_every_budget():
    from piece_mm.experiments.sweep import settings
    grid = {"llm": [0.01], "lr": [1e-3], "steps": [2], "seqft_lr": [1e-4], "exclude": ["embed_tokens", "k_proj"]}
    sparse, seqft = settings(grid)
    assert sparse["budget"]["exclude"] == ["embed_tokens", "k_proj"] and seqft["budget"] is None


@pytest.mark.parametrize("grid, says", [
    ("llm: [2.0]\nlr: [1e-3]\nsteps: [2]\n", "lr holds '1e-3'"),  # YAML reads 1e-3 as a string
    ("llm: [2.0]\nlr: [1.0e-3]\nsteps: [2]\n", "fractions.llm is 2.0"),  # checked as the budget, before any run
    ("llm: [0.01]\nlr: [1.0e-3]\nsteps: [0]\n", "--steps: 0"),  # checked as the run's config
    ("llm: [0.01]\nlr: [1.0e-3]\nsteps: [2]\nexclude: k_proj\n", "exclude is 'k_proj'")])
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path, capsys, grid, says):
    (tmp_path / "grid.yaml").write_text(grid)
    assert sweep_mod.main(["--model", "llava", "--grid", str(tmp_path / "grid.yaml"),
                           "--output", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and says in err and not (tmp_path / "sweep").exists()
