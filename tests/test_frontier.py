"""piece_mm.experiments.frontier: earlier comparisons' summary.json files, read back into one table and figure."""
import json

import pytest

from piece_mm.experiments import frontier


def _summary(path, seeds, methods):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seeds": seeds, "methods": {
        m: {"lr": lr, "OP": op, "BWT": [-0.1] * len(op), "FWT": [0.0] * len(op), "caption_retention": ret}
        for m, (lr, op, ret) in methods.items()}}))
    return path


def test_every_method_once_from_its_most_seeded_summary_and_who_dominates_it(tmp_path):
    one = _summary(tmp_path / "a" / "summary.json", [0],
                   {"ewc": (1e-3, [0.5], [0.5]), "lwf": (3e-4, [0.9], [0.8]), "seqft": (3e-4, [0.6], [0.3])})
    three = _summary(tmp_path / "b" / "summary.json", [0, 1, 2],
                     {"ewc": (3e-4, [0.9, 1.0, 0.95], [0.6, 0.7, 0.65]), "piece-f": (3e-4, [0.7, 0.8, 0.75],
                                                                                     [0.9, 1.0, 0.95])})
    out = tmp_path / "out" / "methods"
    assert frontier.main(["--summaries", f"{one},{three}", "--output", str(out), "--title", "t"]) == 0
    rows = frontier.read([one, three])
    assert set(rows) == {"ewc", "lwf", "seqft", "piece-f"}
    assert rows["ewc"]["seeds"] == [0, 1, 2] and rows["ewc"]["lr"] == 3e-4  # three seeds win over one
    # means: ewc (0.95, 0.65), lwf (0.9, 0.8), seqft (0.6, 0.3), piece-f (0.75, 0.95); by hand:
    # seqft is below every other in both; ewc, lwf and piece-f each beat the others in OP or in retention
    assert frontier.dominators(rows) == {"ewc": [], "lwf": [], "seqft": ["ewc", "lwf", "piece-f"], "piece-f": []}
    table = (tmp_path / "out" / "methods.md").read_text()
    assert "| ewc | 0.0003 | 0, 1, 2 | 0.950 ± 0.041 | -0.100 ± 0.000 | 0.650 ± 0.041 | — |" in table
    assert "| seqft | 0.0003 | 0 | 0.600 | -0.100 | 0.300 | ewc, lwf, piece-f |" in table
    assert (tmp_path / "out" / "methods.png").stat().st_size > 0


def test_a_seed_that_failed_is_left_out_of_that_method_only(tmp_path):
    s = _summary(tmp_path / "summary.json", [0, 1], {"a": (1e-3, [0.5], [0.4]), "b": (1e-3, [0.6, 0.8], [0.5, 0.7])})
    data = json.loads(s.read_text())
    data["failed"] = [{"method": "a", "seed": 0, "lr": 1e-3, "error": "killed"},
                      {"method": "b", "seed": 0, "lr": 3e-3, "error": "killed"}]  # an lr the sweep did not choose
    s.write_text(json.dumps(data))
    rows = frontier.read([s])
    assert rows["a"]["seeds"] == [1] and rows["b"]["seeds"] == [0, 1]


def test_a_tie_in_both_is_not_domination(tmp_path):
    s = _summary(tmp_path / "summary.json", [0], {"a": (1e-3, [0.5], [0.5]), "b": (1e-3, [0.5], [0.5])})
    assert frontier.dominators(frontier.read([s])) == {"a": [], "b": []}


@pytest.mark.parametrize("content, says", [(None, "file not found"), ("{", "not a summary.json"),
                                           ('{"seeds": [0, 1], "methods": {"ewc": {"OP": [1], "BWT": [0, 0], '
                                            '"caption_retention": [1, 1]}}}', "'methods.ewc.OP'"),
                                           ('{"seeds": [0], "methods": [1, 2]}', "not a summary.json")])
def test_bad_summary_one_line_exit_2_nothing_written(tmp_path, capsys, content, says):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    assert frontier.main(["--summaries", str(path), "--output", str(tmp_path / "out" / "m")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and str(path) in err and says in err
    assert not (tmp_path / "out").exists()
