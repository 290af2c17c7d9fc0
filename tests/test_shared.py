"""The shared-format sequence (configs/sequences/world-shared.yaml) and what its study needs: its pictures checked
against what they are said to show, task orders drawn from the file's seed, --exclude for dense and LoRA methods,
LwF from the first task, and the study's lr rule with its bracketing (experiments/study.py)."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from piece_mm.tasks import world
from piece_mm.tasks.sequence import load_sequence

BG = world.BACKGROUND


def _pixels(img):
    """{(x, y): rgb} of every pixel that is not background."""
    w, h = img.size
    px = img.load()
    return {(x, y): px[x, y] for x in range(w) for y in range(h) if px[x, y] != BG}


def test_every_word_of_the_shared_tasks_is_known_to_the_bases():
    """The bases are not rebuilt: every prompt and answer word is in the vocabulary their tokenizers were made from,
    and in the committed tokenizers themselves."""
    from piece_mm.models import resolve
    vocab = set(world.vocabulary())
    toks = [set(json.loads((Path(resolve(a)) / "tokenizer.json").read_text())["model"]["vocab"])
            for a in ("llava", "qwen2-vl")]
    for name in world.SHARED:
        for split in ("train", "test"):
            words = {w for ex in world.task_set(name, split, 200) for w in (ex.prompt + " " + ex.answer).split()}
            assert words <= vocab, (name, words - vocab)
            for t in toks:
                assert words <= t, (name, words - t)


def test_the_pictures_show_what_the_answers_say():
    for ex in world.task_set("stripes", "test", 30):  # exactly the two named colours, in alphabetical order
        colours = {c for c in _pixels(ex.image).values()}
        names = ex.answer.split()
        assert names == sorted(names) and colours == {world.COLORS[n] for n in names}
    for ex in world.task_set("grid", "test", 40):  # the drawn shape's centre lies in the named cell
        xs, ys = zip(*_pixels(ex.image))
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        row, col = map(int, ex.answer.split())
        assert int(cy // (world.IMAGE_SIZE / 3)) + 1 == row and int(cx // (world.IMAGE_SIZE / 3)) + 1 == col
    half = world.IMAGE_SIZE // 2
    for ex in world.task_set("relation", "test", 40):
        px = _pixels(ex.image)
        xs, ys = zip(*px)
        # a vertical pair sits in one side's half, a horizontal pair in the top or bottom half: the general
        # question's answer (where the shapes are) is never the relation's
        vertical = ex.answer in ("top", "bottom")
        if vertical:
            assert max(xs) < half or min(xs) >= half
        else:
            assert max(ys) < half or min(ys) >= half
        first = sum(1 for x, y in px if (y if vertical else x) < half)  # the top (left) shape's pixels
        small_first = first < len(px) - first
        assert ex.answer == (("top", "bottom") if vertical else ("left", "right"))[not small_first]
    for ex in world.task_set("letter", "test", 30):  # the glyph's dots, 4 x 4 pixels each
        assert len(_pixels(ex.image)) == 16 * sum(r.count("#") for r in world._GLYPHS[ex.answer])
    third = world.IMAGE_SIZE / 3
    for ex in world.task_set("mixed", "test", 30):  # four to six shapes, one to a cell, in the two named colours
        px = _pixels(ex.image)
        names = ex.answer.split()
        assert names == sorted(names) and set(px.values()) == {world.COLORS[n] for n in names}
        assert 4 <= len({(int(x // third), int(y // third)) for x, y in px}) <= 6
    for ex in world.task_set("outline", "test", 30):
        big, of, small = ex.answer.split()
        assert of == "of" and big in world.SHAPES and small[:-1] in world.SHAPES and big != small[:-1]


def test_shared_tasks_are_seeded_and_their_splits_disjoint():
    for name in world.SHARED:
        a, b = world.task_set(name, "train", 50), world.task_set(name, "train", 50)
        assert [(x.prompt, x.answer, x.image.tobytes()) for x in a] == [(x.prompt, x.answer, x.image.tobytes())
                                                                        for x in b]
        train = {hashlib.sha1(x.image.tobytes() + x.prompt.encode()).hexdigest() for x in a}
        test = {hashlib.sha1(x.image.tobytes() + x.prompt.encode()).hexdigest()
                for x in world.task_set(name, "test", 50)}
        assert len(train & test) <= 2  # a 3 x 3 grid has few pictures: a repeat by chance, never by seed
    old = world.task_set("color", "train", 5)  # the default sequence's data did not move
    assert [e.answer for e in old] == [e.answer for e in world.task_set("color", "train", 5)]


def test_orders_come_from_the_files_seed(tmp_path):
    names = [t.name for t in load_sequence("world-shared").tasks]
    assert names == ["stripes", "letter", "grid", "relation", "mixed", "outline"]
    assert [t.name for t in load_sequence("world-shared@reverse").tasks] == names[::-1]
    r1 = [t.name for t in load_sequence("world-shared@random-1").tasks]
    r2 = [t.name for t in load_sequence("world-shared@random-2").tasks]
    assert sorted(r1) == sorted(names) == sorted(r2)
    assert len({tuple(names), tuple(names[::-1]), tuple(r1), tuple(r2)}) == 4
    assert r1 == [t.name for t in load_sequence("world-shared@random-1").tasks]  # drawn, not random each time
    text = (Path(world.__file__).parent.parent / "configs" / "sequences" / "world-shared.yaml").read_text()
    assert "random-1 = " + ", ".join(r1) in text.replace("\n# ", " ")  # the file says which orders its seed gives
    with pytest.raises(ValueError, match=r"world-shared.yaml: order 'sideways'"):
        load_sequence("world-shared@sideways")
    seq = tmp_path / "s.yaml"
    seq.write_text("tasks:\n" + "".join(f"  - {{name: {n}, format: world}}\n" for n in names[:4]))
    with pytest.raises(ValueError, match=r"s.yaml: order 'random-1' needs an integer orders.seed"):
        load_sequence(f"{seq}@random-1")


@pytest.mark.parametrize("method", ["seqft", "seqlora"])
def test_exclude_leaves_the_budgets_weights_bit_identical(tiny, method):
    """SeqFT and SeqLoRA with --exclude budget: two steps move weights, but never a token embedding or an LLM key, nor
    (SeqLoRA) a key's adapter: the method's optimizer does not make trainable again what --exclude froze, as the
    run does it (the adapters added, then frozen, then the task's optimizer made)."""
    import re

    from piece_mm.continual import METHODS, freeze, make_scheduler, train_task
    from piece_mm.methods import TaskContext, load_settings
    from piece_mm.select import load_budget
    _, base, processor = tiny
    model = copy.deepcopy(base)
    settings = load_settings(method)
    if METHODS[method].prepare is not None:
        METHODS[method].prepare(model, settings)
    patterns = load_budget("default")["exclude"]
    assert freeze(model, patterns, log=None) > 0
    task = load_sequence("world-shared").tasks[0]
    ctx = TaskContext(lr=1e-3, seed=0, steps=2, batch_size=4, tasks=[task], index=0, output=Path("unused"),
                      settings=settings)
    opt = METHODS[method].for_task(model, processor, task, ctx).optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_task(model, processor, task, opt, make_scheduler(opt, 2), 2, 4, 0, "t")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    excluded = {n for n in before if any(re.search(x, n) for x in patterns)}
    assert excluded and moved and not moved & excluded


def test_exclude_flag_is_checked(tmp_path):
    from piece_mm.errors import InputError
    from piece_mm.runconfig import RunConfig
    from piece_mm.train import frozen_patterns
    assert frozen_patterns(RunConfig(method="seqft", exclude="budget"), "default") == \
        ["embed_tokens\\.", "language_model\\..*\\.k_proj\\."]
    assert frozen_patterns(RunConfig(method="seqlora", exclude="k_proj, v_proj"), "default") == ["k_proj", "v_proj"]
    with pytest.raises(InputError, match="--exclude 'budget': method 'piece-f'"):
        frozen_patterns(RunConfig(method="piece-f", exclude="budget"), "default")
    with pytest.raises(InputError, match=r"--exclude: '\(' is not a regular expression"):
        frozen_patterns(RunConfig(method="seqft", exclude="("), "default")


def test_eval_general_flag_is_checked(tmp_path):
    """--eval-general takes every or last; anything else is one line and exit 2 before anything is written (the
    invariant that last changes no number is tests/test_cli.py's slow test)."""
    from piece_mm.errors import InputError
    from piece_mm.runconfig import RunConfig
    from piece_mm.train import main
    assert RunConfig().eval_general == "every" and RunConfig(eval_general="last").eval_general == "last"
    with pytest.raises(InputError, match="--eval-general 'end': expected every or last"):
        RunConfig(eval_general="end")
    with pytest.raises(SystemExit) as e:
        main(["--eval-general", "end", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()


def test_lwf_distils_on_its_first_task_from_the_base(tiny, tmp_path):
    from piece_mm.batching import collate
    from piece_mm.continual import METHODS
    from piece_mm.methods import TaskContext, load_settings
    _, base, processor = tiny
    model = copy.deepcopy(base)
    tasks = load_sequence("world-shared").tasks[:2]
    ctx = TaskContext(lr=1e-3, seed=0, steps=2, batch_size=4, tasks=tasks, index=0, output=tmp_path,
                      settings=load_settings("lwf"))
    reg = METHODS["lwf"].for_task(model, processor, tasks[0], ctx).regulariser
    assert reg is not None and (tmp_path / "lwf" / "1-stripes.safetensors").is_file()
    batch = collate(processor, tasks[0].train[:2])
    model.eval()
    with torch.no_grad():
        assert float(reg(model, batch, model(**batch))) == pytest.approx(0.0, abs=1e-4)  # the teacher is the base
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        assert float(reg(model, batch, model(**batch))) > 1e-3


# --- the study's lr rule and bracketing, with runs replaced by a table of numbers ------------------------------

def _fake_runs(table, calls):
    """run_jobs stand-in: each job's metrics from table(method, lr, setting, seed) -> (OP, caption retention)."""
    from piece_mm.experiments.runs import Outcome

    def run_jobs(jobs, parallel=1, threads=None, on_done=None):
        out = {}
        for j in jobs:
            c = j.config
            setting = None
            if "method_config" in c:
                import yaml
                setting = yaml.safe_load(Path(c["method_config"]).read_text())
            calls.append((c["method"], c["lr"], c["seed"], json.dumps(setting, sort_keys=True)))
            op, ret = table(c["method"], c["lr"], setting, c["seed"])
            m = {"model": "llava", "method": c["method"], "seed": c["seed"], "tasks": ["a", "b"],
                 "scores": [[0, 0], [op, 0], [op, op]], "parameters": 10, "trainable": {"total": 5},
                 "peak_memory_mb": 1.0, "time_s": 1.0,
                 "summary": {"OP": op, "BWT": 0.0, "FWT": 0.0, "caption_retention": ret},
                 "general": {"before": {"CIDEr": 1.0}, "after": [{"CIDEr": ret}, {"CIDEr": ret}]}}
            out[j.key] = Outcome(j.key, Path(c["output"]), metrics=m)
        return out
    return run_jobs


def test_study_rule_brackets_every_choice(tmp_path, monkeypatch):
    """SeqFT's best lr under the rule (OP rises with lr, retention falls below 0.90 above 3e-4) is inside its grid;
    an arm whose choice sits at the edge gets the next point; LwF's weight is chosen at the chosen lr; the other
    seeds run at the choice only."""
    import yaml

    from piece_mm.experiments import study

    def table(method, lr, setting, seed):
        if method == "seqft":  # OP grows with lr; retention >= 0.9 up to 3e-4
            return min(1.0, lr * 1000), (0.95 if lr <= 3.1e-4 else 0.5)
        if method == "lwf":  # every lr keeps retention: the highest lr wins, so the grid grows upward
            w = setting["weight"]
            return min(1.0, lr * 500) - (0.1 if w == 3.0 else 0.0), 0.95 if w >= 1.0 else 0.8
        return 0.5, 0.5
    calls = []
    monkeypatch.setattr(study, "run_jobs", _fake_runs(table, calls))
    spec = {"tasks": "world-shared", "seeds": [0, 1], "arms": [
        {"name": "seqft", "method": "seqft", "lrs": [1e-4, 3e-4, 1e-3]},
        {"name": "lwf", "method": "lwf", "lrs": [1e-4, 3e-4, 1e-3], "settings": {"weight": [0.3, 1.0, 3.0]}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["methods"]["seqft"]["lr"] == pytest.approx(3e-4)
    assert len([c for c in calls if c[0] == "seqft" and c[2] == 0]) == 3  # 3e-4 is inside: no extension
    # LwF: 1e-3 at the top edge -> 3e-3 (OP 1.0), still the edge -> 9e-3 (OP 1.0, a tie: the lower lr); max 2 more
    lwf_lrs = sorted({c[1] for c in calls if c[0] == "lwf" and c[2] == 0})
    assert lwf_lrs == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 9e-3])
    assert s["methods"]["lwf"]["lr"] == pytest.approx(3e-3) and s["methods"]["lwf"]["settings"]["weight"] == 1.0
    weights = sorted(json.loads(c[3])["weight"] for c in calls if c[0] == "lwf" and c[1] == pytest.approx(3e-3)
                     and c[2] == 0)
    assert weights == [0.3, 1.0, 3.0]  # the grid of three at the chosen lr (1.0 already ran in the lr search)
    assert [c[2] for c in calls if c[2] == 1] == [1, 1]  # one more seed per arm, at the choice
    assert s["methods"]["seqft"]["seeds"] == [0, 1] and len(s["methods"]["lwf"]["grid"]) == 7
    assert "caption retention >= 0.9" in s["rule"]
    grid = (tmp_path / "out" / "table.md").read_text().split("## Each arm's grid on its first seed")[1]
    assert "| seqft | **0.0003** | **—** | **0.300** |" in grid and "| seqft | 0.001 | — | 1.000 |" in grid
    assert "| lwf | **0.003** | **weight 1** |" in grid and "| lwf | 0.003 | weight 3 | 0.900 |" in grid
    assert grid.count("**OP**") == 0 and sum("**" in x for x in grid.splitlines()) == 2  # one choice per arm
    assert s["run_time"] == {"runs": len(calls), "sum_s": 1.0 * len(calls)}  # every run made, 1 s each
    from piece_mm.experiments import frontier  # the frontier figure reads a study's summary as a comparison's
    rows = frontier.read([tmp_path / "out" / "summary.json"])
    assert rows["seqft"]["OP"] == s["methods"]["seqft"]["OP"] and len(rows["lwf"]["seeds"]) == 2


def test_study_widens_a_constant_chosen_at_its_edge(tmp_path, monkeypatch):
    """EWC's lambda best at 100 (from [0.1, 1, 10]): 10 at the top edge gets 100, then 100 at the edge gets 1000, and
    100 is chosen, inside; LwF's weight best below its list's bottom gets one lower point; max_extensions bounds it."""
    import math

    import yaml

    from piece_mm.experiments import study

    def table(method, lr, setting, seed):
        near = -0.001 * abs(math.log10(lr) + 3.5)  # the lr: 3e-4 is the best of the grid, inside it
        if method == "ewc":
            return 0.5 + near - 0.01 * abs(math.log10(setting["lambda"]) - 2), 0.95
        return 0.5 + near - 0.01 * setting["weight"], 0.95
    calls = []
    monkeypatch.setattr(study, "run_jobs", _fake_runs(table, calls))
    spec = {"tasks": "world-shared", "seeds": [0], "max_extensions": 2, "arms": [
        {"name": "ewc", "method": "ewc", "lrs": [1e-4, 3e-4, 1e-3], "settings": {"lambda": [0.1, 1.0, 10.0]}},
        {"name": "lwf", "method": "lwf", "lrs": [1e-4, 3e-4, 1e-3], "settings": {"weight": [0.3, 1.0, 3.0]}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    tried = sorted(json.loads(c[3])["lambda"] for c in calls if c[0] == "ewc" and c[1] == pytest.approx(3e-4))
    assert tried == pytest.approx([0.1, 1.0, 10.0, 100.0, 1000.0])
    assert s["methods"]["ewc"]["settings"]["lambda"] == 100.0 and s["methods"]["ewc"]["lr"] == pytest.approx(3e-4)
    # weight: 0.3 at the bottom edge -> 0.09, still the edge -> 0.03 (0.027 to one digit; two widenings at most)
    tried = sorted(json.loads(c[3])["weight"] for c in calls if c[0] == "lwf" and c[1] == pytest.approx(3e-4))
    assert tried == pytest.approx([0.03, 0.09, 0.3, 1.0, 3.0])
    assert s["methods"]["lwf"]["settings"]["weight"] == pytest.approx(0.03)
    spec["max_extensions"] = 0  # no widening: the list as given
    path.write_text(yaml.safe_dump(spec))
    calls.clear()
    assert study.main([str(path), "--output", str(tmp_path / "none")]) == 0
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["methods"]["ewc"]["settings"]["lambda"] == 10


def test_study_arm_with_fewer_seeds_is_read_for_its_own(tmp_path, monkeypatch):
    """An arm that runs seed 0 only, in a study of seeds 0 and 1: its row, its table label and the frontier's reading
    are for seed 0 alone, and no seed-1 run is made for it."""
    import yaml

    from piece_mm.experiments import frontier, study
    calls = []
    monkeypatch.setattr(study, "run_jobs", _fake_runs(lambda m, lr, st, seed: (0.5 + 0.1 * seed, 0.95), calls))
    spec = {"tasks": "world-shared", "seeds": [0, 1], "arms": [
        {"name": "piece-f", "method": "piece-f", "lrs": [2e-3]},
        {"name": "seqft", "method": "seqft", "lrs": [1e-4, 3e-4, 1e-3], "seeds": [0]}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "out")]) == 0
    assert not [c for c in calls if c[0] == "seqft" and c[2] == 1]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["methods"]["seqft"]["seeds"] == [0] and s["methods"]["seqft"]["OP"] == [0.5]
    assert s["methods"]["piece-f"]["OP"] == [0.5, 0.6]
    table = (tmp_path / "out" / "table.md").read_text()
    row = next(x for x in table.splitlines() if x.startswith("| seqft (seed 0) | "))
    assert "| 0.500 | 0.000 | 0.000 | 0.950 |" in row  # one seed: no spread shown
    assert "| piece-f | 0.002 | 0.550 ± 0.050 |" in table
    rows = frontier.read([tmp_path / "out" / "summary.json"])
    assert rows["seqft"]["seeds"] == [0] and rows["piece-f"]["seeds"] == [0, 1]


def test_study_finished_reads_back_and_starts_nothing(tmp_path, monkeypatch):
    """--finished on a study part-way: the arms whose every run finished get the rows the whole study gave them; an
    arm with one run missing (here a seed-1 run) is left out and named; no run is started, and no run's settings
    file is written."""
    import yaml

    from piece_mm.experiments import study
    fake = _fake_runs(lambda m, lr, st, seed: (min(1.0, lr * 1000) + 0.01 * seed, 0.95 if lr <= 3.1e-4 else 0.5), [])

    def run_and_write(jobs, parallel=1, threads=None, on_done=None):  # the fake runs, their metrics.json written
        got = fake(jobs)
        for o in got.values():
            o.output.mkdir(parents=True, exist_ok=True)
            (o.output / "metrics.json").write_text(json.dumps(o.metrics))
        return got
    monkeypatch.setattr(study, "run_jobs", run_and_write)
    spec = {"tasks": "world-shared", "seeds": [0, 1], "arms": [
        {"name": "seqft", "method": "seqft", "lrs": [1e-4, 3e-4, 1e-3]},
        {"name": "ewc", "method": "ewc", "lrs": [1e-4, 3e-4, 1e-3]},
        {"name": "lwf", "method": "lwf", "lrs": [1e-4, 3e-4, 1e-3], "settings": {"weight": [0.3, 1.0, 3.0]}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "full")]) == 0
    assert (tmp_path / "full" / "settings").is_dir()  # the runs with a constant read their settings from there
    whole = json.loads((tmp_path / "full" / "summary.json").read_text())
    runs = tmp_path / "full" / "runs"
    (runs / "ewc-lr0.0003-seed1" / "metrics.json").unlink()  # ewc still has a run to make

    def started(*a, **k):
        raise AssertionError("--finished started a run")
    monkeypatch.setattr(study, "run_jobs", started)
    spec["runs"] = str(runs)
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "part"), "--finished"]) == 0
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert part["methods"]["seqft"] == whole["methods"]["seqft"]
    assert part["methods"]["lwf"] == whole["methods"]["lwf"]
    assert not (tmp_path / "part" / "settings").exists()
    assert part["methods"]["seqft"]["lr"] == pytest.approx(3e-4)
    assert "ewc" not in part["methods"] and part["unfinished"] == ["ewc"]
    table = (tmp_path / "part" / "table.md").read_text()
    assert "Not finished (left out: a run of each is still to make): ewc." in table
    # its seed-0 grid is finished, so it is listed (no choice made: nothing in bold)
    assert [x.split(" | ")[1] for x in table.splitlines() if x.startswith("| ewc (unfinished) |")] == \
        ["0.0001", "0.0003", "0.001"]
    assert "| ewc |" not in table and "| ewc (unfinished) | **" not in table
    assert part["unfinished_grid"]["ewc"] == whole["methods"]["ewc"]["grid"]
    assert part["run_time"]["runs"] == whole["run_time"]["runs"] - 1  # the missing run is not counted
    (runs / "seqft-lr0.0001-seed0" / "metrics.json").unlink()  # now no arm is whole: exit 1, one line
    for f in runs.glob("lwf-*-seed1/metrics.json"):
        f.unlink()
    assert study.main([str(path), "--output", str(tmp_path / "none"), "--finished"]) == 1


@pytest.mark.parametrize("spec, says", [
    ({"arms": [{"name": "x", "method": "nosuch", "lrs": [1e-3]}]}, "arms[0].method is 'nosuch'"),
    ({"arms": [{"name": "x", "method": "seqft", "lrs": []}]}, "arms[0].lrs is []"),
    ({"arms": [{"name": "x", "method": "lwf", "lrs": [1e-3], "settings": {"weight": [1, 2]}}]}, "odd number"),
    ({"arms": [{"name": "x", "method": "lwf", "lrs": [1e-3], "settings": {"wieght": 1}}]}, "settings.wieght"),
    ({"arms": [{"name": "x", "method": "piece-f", "lrs": [1e-3], "exclude": "budget"}]}, "--exclude 'budget'"),
    ({"arms": [{"name": "x", "method": "seqft", "lrs": [1e-3], "tasks": "world-shared@up"}]}, "order 'up'"),
])
def test_study_bad_input_one_line_exit_2(tmp_path, capsys, spec, says):
    import yaml

    from piece_mm.experiments import study
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study.main([str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and says in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_keep_earlier_never_chooses_an_earlier_tasks_weight(tmp_path):
    """budget keep_earlier: task 2's mask shares no element with task 1's (without it, PIECE-F's masks overlap)."""
    import subprocess
    import sys

    import yaml

    from piece_mm.delta import load_masks
    seq = tmp_path / "two.yaml"
    seq.write_text("tasks:\n  - {name: grid, format: world}\n  - {name: relation, format: world}\n"
                   "world: {train_examples: 16, test_examples: 2}\ngeneral: {captions: 2, vqa: 2}\n")
    overlap = {}
    for keep in (False, True):
        b = yaml.safe_load((Path(world.__file__).parent.parent / "configs" / "budgets" / "default.yaml").read_text())
        b.update(keep_earlier=keep, score_examples=16, distill={"weight": 0.0})
        bp = tmp_path / f"b{keep}.yaml"
        bp.write_text(yaml.safe_dump(b))
        out = tmp_path / f"run{keep}"
        r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", "llava", "--tasks", str(seq),
                            "--budget", str(bp), "--max-steps", "1", "--batch-size", "2", "--eval-limit", "2",
                            "--output", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        m1, m2 = (load_masks(out / "masks" / f) for f in ("1-grid.safetensors", "2-relation.safetensors"))
        overlap[keep] = sum(len(set(m1[n].tolist()) & set(m2[n].tolist())) for n in m1 if n in m2)
    assert overlap[False] > 0 and overlap[True] == 0


STUDIES = Path(__file__).parents[1] / "configs" / "studies"


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.glob("*.yaml")))
def test_shipped_study_files_load(name):
    """Every study regenerate.sh runs is a valid study file: its arms, seeds and runs directory as written."""
    from piece_mm.experiments.study import load_study
    s = load_study(STUDIES / name)
    assert s["arms"] and all(a["lrs"] for a in s["arms"])
    assert len({a["name"] for a in s["arms"]}) == len(s["arms"])
