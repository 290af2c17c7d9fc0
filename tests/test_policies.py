"""piece_mm.experiments.policies: five budget policies at equal totals, each at its own lr."""
import json
import math

import pytest

from piece_mm.errors import InputError
from piece_mm.experiments import policies as pol
from piece_mm.select import component_k

SIZES = {"vision": 249_504, "projector": 28_928, "llm": 614_016}  # the tiny LLaVA's, keys and embeddings left out


@pytest.mark.parametrize("total", [0.001, 0.003, 0.01, 0.03])
def test_every_policy_tunes_the_same_number_of_weights(total):
    n = sum(SIZES.values())
    want = component_k(total, n)
    for p in pol.POLICIES:
        b = pol.policy_budget(p, total, SIZES, {"exclude": ["embed_tokens\\."]})
        assert b["exclude"] == ["embed_tokens\\."]
        if p in ("global", "auto"):
            assert b["pool"] == p and b["total"] == total
            continue
        f = b["fractions"]
        got = sum(component_k(f[c], SIZES[c]) for c in SIZES)
        assert abs(got - want) <= 3, (p, got, want)  # one floor per component
        on = {c for c in SIZES if f[c] > 0}
        assert on == {"llm": {"llm"}, "llm+projector": {"llm", "projector"},
                      "proportional": set(SIZES)}[p], p
        assert len({f[c] for c in on}) == 1  # the same fraction of each component it spends on
    assert pol.policy_budget("proportional", total, SIZES, {})["fractions"]["vision"] == total


def test_a_total_too_large_for_a_policy_is_refused():
    with pytest.raises(InputError, match="policy llm"):
        pol.policy_budget("llm", 0.9, SIZES, {})


def test_a_total_takes_the_lr_of_the_nearest_total_where_it_was_chosen():
    assert [pol.nearest(t, [0.01, 0.03]) for t in (0.001, 0.003, 0.01, 0.02, 0.03, 0.1)] == \
        [0.01, 0.01, 0.01, 0.03, 0.03, 0.03]  # 0.02: log-nearer 0.03 (ratio 1.5 against 2)
    assert pol.nearest(0.01, []) is None


def test_the_lr_rule_prefers_op_among_those_that_keep_the_captions():
    rows = [{"lr": 1e-3, "OP": 0.80, "caption_retention": 0.99}, {"lr": 3e-3, "OP": 0.90, "caption_retention": 0.95},
            {"lr": 1e-2, "OP": 0.97, "caption_retention": 0.60}]
    assert pol.choose_lr(rows)["lr"] == 3e-3  # 1e-2 learns most but loses the captions
    low = [{**r, "caption_retention": r["caption_retention"] - 0.5} for r in rows]
    assert pol.choose_lr(low)["lr"] == 1e-3  # none keeps 0.90: the one that keeps the most
    tie = [{"lr": 3e-3, "OP": 0.5, "caption_retention": 1.0}, {"lr": 1e-3, "OP": 0.5, "caption_retention": 1.0}]
    assert pol.choose_lr(tie)["lr"] == pol.choose_lr(tie[::-1])["lr"] == 1e-3  # a tie: the lower lr, in any order


@pytest.mark.parametrize("argv, says", [
    (["--policies", "llm,everything"], "--policies: 'everything'"),
    (["--choose-at", "0.01,0.05"], "--choose-at 0.05"),
    (["--seeded", "0.01,0.2"], "--seeded 0.2"),
    (["--seeds", "1,2"], "must hold seed 0"),
    (["--totals", "0.01,two"], "--totals"),
    (["--totals", "0.01,1.5", "--choose-at", "0.01"], "--totals"),
    (["--jobs", "0"], "--jobs"),
    (["--models", "no-such-model"], "no-such-model"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    assert pol.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and says in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_study_runs_chooses_lrs_and_writes_its_tables_and_figures(tmp_path, capsys):
    (tmp_path / "seq.yaml").write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                                       "world: {train_examples: 8, test_examples: 4}\ngeneral: {captions: 3, vqa: 3}\n")
    out = tmp_path / "study"
    argv = ["--models", "llava", "--totals", "0.01,0.03", "--policies", "global,auto", "--lrs", "1.0e-3,3.0e-3",
            "--seeds", "0,1", "--seeded", "0.01", "--choose-at", "0.01", "--steps", "2", "--batch-size", "4",
            "--eval-limit", "3", "--score-examples", "8", "--tasks", str(tmp_path / "seq.yaml"), "--output", str(out),
            "--jobs", "2"]
    assert pol.main(argv) == 0
    rec = json.loads((out / "policies.json").read_text())
    runs = rec["runs"]
    assert f"PIECE-F on the sequence {tmp_path / 'seq.yaml'}, 2 steps of 4" in (out / "table.md").read_text()
    # the lr grid (2 policies x 2 lrs), then seed 1 at 1 % and seed 0 at 3 %, at each policy's chosen lr
    assert len(runs) == 8
    for p in ("global", "auto"):
        grid = [r for r in runs if r["policy"] == p and r["total"] == 0.01 and r["seed"] == 0]
        lr = pol.choose_lr(grid)["lr"]
        assert len(grid) == 2 and rec["chosen_lr"][f"llava {p} 0.01"] == rec["chosen_lr"][f"llava {p} 0.03"] == lr
        rest = [r for r in runs if r["policy"] == p and r not in grid]
        assert {(r["total"], r["seed"]) for r in rest} == {(0.01, 1), (0.03, 0)}
        assert all(r["lr"] == lr for r in rest)
    n = sum(rec["sizes"]["llava"].values())
    for r in runs:  # every task of every policy tunes the total's k, read from the run's own metrics.json
        m = json.loads((out / "runs" / f"llava-{r['policy']}-{r['total']:g}-lr{r['lr']:g}-seed{r['seed']}" /
                        "metrics.json").read_text())
        assert [s["total"] for s in m["selection"]] == [math.floor(r["total"] * n)] * 2
        assert [sum(s.values()) for s in r["split"]] == [s["total"] for s in m["selection"]]
        assert r["caption_retention"] == m["summary"]["caption_retention"] and r["OP"] == m["summary"]["OP"]
        assert r["overlap"] == [m["mask_jaccard"][0][1]]
    table = (out / "table.md").read_text()
    assert "Where the global pool's budget goes" in table and "| 3 % | auto |" in table
    for f in ("retention_vs_op-llava.png", "shares-llava.png", "overlap-llava.png"):
        assert (out / f).stat().st_size > 10_000, f
    # finished runs are read back, not rerun
    one = next((out / "runs").iterdir()) / "metrics.json"
    mtime = one.stat().st_mtime
    assert pol.main(argv) == 0 and one.stat().st_mtime == mtime
    # the same output with another budget (more examples scored): refused before anything is written
    budget = out / "budgets" / "llava-auto-0.01.yaml"
    before = budget.read_text()
    capsys.readouterr()
    assert pol.main([*argv, "--score-examples", "9"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "another budget" in err, err
    assert budget.read_text() == before and one.stat().st_mtime == mtime
