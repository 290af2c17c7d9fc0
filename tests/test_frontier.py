"""piece_mm.experiments.frontier: earlier comparisons' summary.json files, read back into one table and figure."""
import json

import pytest

from piece_mm.experiments import frontier
from piece_mm.experiments.labels import place_labels


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
    # compared over the seeds both ran: lwf and seqft ran seed 0 only, so each is set against seed 0 of the others
    # (ewc 0.9 / 0.6, piece-f 0.7 / 0.9); ewc and piece-f over their three (0.95 / 0.65 against 0.75 / 0.95). By hand:
    # seqft (0.6 / 0.3) is below every other in both; lwf (0.9 / 0.8) ties ewc's seed 0 in OP and keeps more, so it
    # dominates ewc there (ewc's mean OP over three, 0.95, would have hidden that); piece-f and lwf each beat the other
    # in one
    assert frontier.dominators(rows) == {"ewc": ["lwf"], "lwf": [], "seqft": ["ewc", "lwf", "piece-f"],
                                         "piece-f": []}
    table = (tmp_path / "out" / "methods.md").read_text()
    assert "| ewc | 0.0003 | 0, 1, 2 | 0.950 ± 0.041 | -0.100 ± 0.000 | 0.650 ± 0.041 | lwf |" in table
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


def test_a_row_of_one_seed_is_set_against_that_seed_of_the_others(tmp_path):
    """A one-seed arm that is another arm's seed-0 run (a study's rule arm choosing the default's lr) does not
    dominate that arm because the other's mean over three seeds is lower; one that beats only the other's mean is
    not dominated by it either."""
    s = _summary(tmp_path / "summary.json", [0, 1, 2], {"piece-f": (2e-3, [0.46, 0.45, 0.40], [0.97, 0.94, 0.95])})
    data = json.loads(s.read_text())
    data["methods"]["rule"] = {**data["methods"]["piece-f"], "OP": [0.46], "BWT": [-0.1],
                               "caption_retention": [0.97], "seeds": [0]}
    data["methods"]["base"] = {"lr": 1e-4, "OP": [0.44], "BWT": [-0.1], "caption_retention": [0.96], "seeds": [0]}
    s.write_text(json.dumps(data))
    dom = frontier.dominators(frontier.read([s]))
    # means over its own seeds would have piece-f (0.437 / 0.953) dominated by both; over seed 0 it is rule's twin
    # and beats base
    assert dom == {"piece-f": [], "rule": [], "base": ["piece-f", "rule"]}


def test_the_arms_a_study_left_unfinished_are_named(tmp_path):
    """A study written with --finished names its arms still running: the frontier names them too, unless another
    summary has a row for one."""
    a = _summary(tmp_path / "a" / "summary.json", [0], {"piece-f": (2e-3, [0.5], [0.9])})
    data = json.loads(a.read_text())
    data["unfinished"] = ["multitask", "lwf"]
    a.write_text(json.dumps(data))
    b = _summary(tmp_path / "b" / "summary.json", [0], {"lwf": (3e-4, [0.4], [0.8])})
    out = tmp_path / "f"
    assert frontier.main(["--summaries", f"{a},{b}", "--output", str(out)]) == 0
    table = (tmp_path / "f.md").read_text()
    assert "Not in this table, a run of each still to make: multitask." in table
    assert "| lwf | 0.0003 |" in table
    assert frontier.main(["--summaries", str(b), "--output", str(tmp_path / "g")]) == 0
    assert "still to make" not in (tmp_path / "g.md").read_text()


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


def test_labels_of_a_crowded_cluster_do_not_overlap_and_stay_in_the_frame():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xlim(0, 1.15)
    ax.set_ylim(0, 1.1)
    pts = [(f"method-{i}", (0.86 + 0.01 * i, 0.99 + 0.002 * (i % 3)), "k") for i in range(6)] + \
          [("at-the-floor", (0.77, 0.0), "k")]
    for _, xy, _ in pts:
        ax.plot(*xy, "o")
    fig.tight_layout()
    place_labels(fig, ax, pts)
    r = fig.canvas.get_renderer()
    names = [t for t in ax.texts if t.get_text()]  # the labels (a far one also has a line to its point)
    boxes = [t.get_window_extent(r) for t in names]
    frame = ax.get_window_extent(r)
    assert [t.get_text() for t in names] == [n for n, _, _ in pts]  # every point named once
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_labels_keep_clear_of_a_legend_inside_the_axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    # a legend pinned in the upper right and points just left of and below it: the labels' first choice (up and right
    # of each point) falls inside it
    ax.plot([], [], "o", label="a legend entry")
    ax.plot([], [], "s", label="another one")
    pts = [("first", (0.70, 0.90), "k"), ("second", (0.74, 0.80), "k"), ("third", (0.80, 0.70), "k")]
    for _, xy, _ in pts:
        ax.plot(*xy, "o", color="k")
    leg = ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    place_labels(fig, ax, pts)
    r = fig.canvas.get_renderer()
    box = leg.get_window_extent(r)
    names = [t for t in ax.texts if t.get_text()]
    assert len(names) == len(pts)
    assert not any(t.get_window_extent(r).overlaps(box) for t in names)
    plt.close(fig)
