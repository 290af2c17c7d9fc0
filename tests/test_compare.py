"""piece_mm.experiments.compare: every method in-process (each run in a process of its own), the same lr sweep for
all, summary.json in its schema; experiments.runs: a failed or killed run does not take the others down."""
import json
import statistics
import threading
import time

import pytest

from piece_mm.experiments import compare as cmp
from piece_mm.experiments import runs


def _sequence(tmp_path):
    seq = tmp_path / "two.yaml"
    seq.write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                   "world: {train_examples: 16, test_examples: 4}\ngeneral: {captions: 4, vqa: 4}\n")
    return seq


def _compare(tmp_path, *extra):
    return cmp.main(["--model", "llava", "--tasks", str(_sequence(tmp_path)), "--output", str(tmp_path / "cmp"),
                     *extra])


@pytest.mark.slow
def test_compare_runs_every_method_and_seed(tmp_path):
    assert _compare(tmp_path, "--methods", "piece-f", "--seeds", "0,1", "--lrs", "1.0e-4,1.0e-3",
                    "--max-steps", "2", "--eval-limit", "4") == 0
    out = tmp_path / "cmp"
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [0, 1] and set(s["methods"]) == {"piece-f"} and "failed" not in s
    for method, row in s["methods"].items():
        # the chosen lr is the one with the best OP on seed 0, and each seed's numbers are its run's
        first = {lr: json.loads((out / "runs" / f"{method}-lr{lr:g}-seed0" / "metrics.json").read_text())
                 for lr in (1e-4, 1e-3)}
        assert row["lr"] == max(first, key=lambda lr: (first[lr]["summary"]["OP"], -lr))
        got = [json.loads((out / "runs" / f"{method}-lr{row['lr']:g}-seed{s_}" / "metrics.json").read_text())
               for s_ in (0, 1)]
        assert [m["seed"] for m in got] == [0, 1]
        import torch
        import transformers
        assert got[0]["versions"]["torch"] == torch.__version__.split("+")[0]  # what made the run, in its record
        assert got[0]["versions"]["transformers"] == transformers.__version__
        for k in ("OP", "BWT", "FWT", "caption_retention"):
            assert row[k] == [m["summary"][k] for m in got]
        assert row["time_s"] == [m["time_s"] for m in got] and row["peak_memory_mb"] > 0
        assert 0 < row["trainable_fraction"] < 0.05  # the default budget: 3 % of the LLM
        assert row["trainable_fraction"] == got[0]["trainable"]["total"] / got[0]["parameters"]
    assert len(list((out / "runs").iterdir())) == 3  # two lrs on seed 0, the chosen one on seed 1
    assert "2 steps x batch" in (out / "runs" / "piece-f-lr0.001-seed0" / runs.LOG).read_text()  # a log per run
    table = (out / "table.md").read_text()
    op = s["methods"]["piece-f"]["OP"]
    assert f"{statistics.mean(op):.3f} ± {statistics.pstdev(op):.3f}" in table
    assert (out / "retention_vs_op.png").stat().st_size > 0 and (out / "cider.png").stat().st_size > 0


@pytest.mark.parametrize("argv, says", [(["--methods", "seqft,nosuch"], "'nosuch'"), (["--seeds", "a,b"], "--seeds"),
                                        (["--max-steps", "0"], "--max-steps"), (["--budget", "nosuch"], "nosuch"),
                                        (["--jobs", "0"], "--jobs")])
def test_compare_bad_input_one_line_exit_2(tmp_path, capsys, argv, says):
    assert _compare(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and says in err and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_compare_lr_from_an_earlier_summary_runs_every_seed_at_that_lr(tmp_path, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"seeds": [0], "methods": {"piece-f": {"lr": 1.0e-3}, "seqft": {"lr": 3.0e-4}}}))
    assert _compare(tmp_path, "--methods", "piece-f", "--seeds", "0,1", "--lr-from", str(earlier),
                    "--max-steps", "2", "--eval-limit", "4") == 0
    out = tmp_path / "cmp"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["piece-f-lr0.001-seed0", "piece-f-lr0.001-seed1"]
    row = json.loads((out / "summary.json").read_text())["methods"]["piece-f"]
    assert row["lr"] == 1.0e-3
    got = [json.loads((out / "runs" / f"piece-f-lr0.001-seed{s_}" / "metrics.json").read_text()) for s_ in (0, 1)]
    for k in ("answer_leak", "bare_answer"):
        assert row[k] == [m["general"]["after"][-1][k] for m in got]
    assert "answer leak" in (out / "table.md").read_text()
    capsys.readouterr()
    assert _compare(tmp_path, "--methods", "olora", "--lr-from", str(earlier)) == 2  # not in the earlier comparison
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and str(earlier) in err and "'olora'" in err


def test_an_interrupted_run_is_resumed_a_finished_one_read_back(tmp_path):
    """A run killed part-way leaves checkpoint.json: its next launch resumes it (piece_mm.train refuses to start
    afresh over an unfinished run). A finished one is not launched. A failure's old reason is cleared."""
    def job(name):
        return runs.Job(name, {"model": "llava", "method": "piece-f", "output": tmp_path / name, "max_steps": 5})
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "checkpoint.json").write_text("{}")
    (tmp_path / "stopped" / runs.FAILED).write_text("error: earlier\n")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    fresh, stopped, done = (runs.launch_config(job(n)) for n in ("fresh", "stopped", "done"))
    assert fresh["resume"] is False and fresh["max_steps"] == 5 and (tmp_path / "fresh").is_dir()
    assert stopped["resume"] is True and not (tmp_path / "stopped" / runs.FAILED).exists()
    assert done is None
    from piece_mm.runconfig import RunConfig
    RunConfig(**fresh)  # what the worker builds


@pytest.mark.slow
def test_a_run_that_fails_or_dies_does_not_take_the_others_down(tmp_path):
    seq = _sequence(tmp_path)
    base = {"model": "llava", "tasks": str(seq), "max_steps": 2, "eval_limit": 4}
    jobs = [runs.Job("good", {**base, "method": "piece-f", "output": tmp_path / "good"}),
            runs.Job("bad", {**base, "method": "piece-f", "budget": str(tmp_path / "none.yaml"),
                             "output": tmp_path / "bad"}),
            runs.Job("killed", {**base, "method": "seqft", "max_steps": 400, "output": tmp_path / "killed"})]

    def kill_the_long_run():  # what an out-of-memory kill does to a run
        deadline = time.time() + 300
        while time.time() < deadline:
            log = tmp_path / "killed" / runs.LOG
            if log.is_file() and "steps x batch" in log.read_text():
                import multiprocessing
                for p in multiprocessing.active_children():
                    if p.name == "run killed":
                        p.kill()
                        return
            time.sleep(0.5)
    threading.Thread(target=kill_the_long_run, daemon=True).start()
    done = runs.run_jobs(jobs, parallel=2, threads=1)
    assert done["good"].metrics is not None and done["good"].error is None
    assert done["bad"].metrics is None and done["bad"].bad_input and "none.yaml" in done["bad"].error
    assert done["bad"].error.count("\n") == 0
    assert done["killed"].metrics is None and "killed by signal 9" in done["killed"].error
    assert json.loads((tmp_path / "good" / "metrics.json").read_text())["summary"] == done["good"].metrics["summary"]


def test_runs_all_read_back_start_nothing_and_return(tmp_path):
    """Every run finished already (a study run again): each is read back, no process starts, and it returns."""
    import multiprocessing
    for n in "ab":
        (tmp_path / n).mkdir()
        (tmp_path / n / "metrics.json").write_text(json.dumps({"summary": {"OP": 0.5}}))
    result = {}
    t = threading.Thread(target=lambda: result.update(runs.run_jobs(
        [runs.Job(n, {"output": tmp_path / n}) for n in "ab"], parallel=2)), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "run_jobs waited on nothing"
    assert {k: o.metrics["summary"]["OP"] for k, o in result.items()} == {"a": 0.5, "b": 0.5}
    assert not multiprocessing.active_children()


def test_versus_puts_one_methods_seeds_side_by_side(tmp_path, capsys):
    """experiments.versus: per seed and metric, A, B and B − A; the largest difference of the means over the seeds
    both ran, computed here by hand; bad input is one line and exit 2."""
    import json

    from piece_mm.experiments.versus import main
    a = {"seeds": [0, 1, 2], "methods": {"piece-f": {"OP": [0.9, 0.8, 0.7], "BWT": [0.0, -0.1, 0.0],
                                                     "caption_retention": [1.0, 1.0, 1.0]}}}
    b = {"seeds": [0, 1], "methods": {"piece-f": {"OP": [0.92, 0.83], "BWT": [0.0, -0.1],
                                                  "caption_retention": [0.99, 1.0]}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "t.md"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "x,y", "--output", str(out)]) == 0
    text = out.read_text()
    assert f"largest difference of the means: {((0.92 + 0.83) - (0.9 + 0.8)) / 2:.3f}" in text
    assert "| 1 | OP | 0.800 | 0.830 | +0.030 |" in text and "| mean | **caption_retention** | 1.000 | 0.995 |" in text
    assert "vqa_retention" not in text  # neither has it
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--method", "seqft"]) == 2
    assert "no method 'seqft'" in capsys.readouterr().err
