"""The paper's recipes (configs/sequences/paper-vqav2.yaml, vqacl-10.yaml) on a data root in the official formats
(tests/paperdata.py): what they load, the steps they derive, the errors a wrong root gives, and (slow) each recipe end
to end on the tiny model."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import paperdata  # tests/paperdata.py, beside this file (as realdata.py)
import pytest
import yaml

from piece_mm.tasks.sequence import load_sequence

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return paperdata.make(tmp_path_factory.mktemp("paper"))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", "llava", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("recipe, n_tasks", [("paper-vqav2", 3), ("vqacl-10", 10)])
def test_recipe_loads_the_official_layout(root, recipe, n_tasks):
    seq = load_sequence(recipe, data_root=root)
    assert len(seq.tasks) == n_tasks and seq.data_root == root
    groups = yaml.safe_load((ROOT / "configs" / "vqacl_groups.yaml").read_text())
    for t in seq.tasks:
        qtype = paperdata.QUESTIONS[t.name][0]
        assert qtype in groups[t.name]  # the fixture asks each group one of its own question types
        assert len(t.train) == paperdata.SIZES["train"] and len(t.test) == paperdata.SIZES["val"]
        assert all("train2014" in str(ex.image) for ex in t.train) and all("val2014" in str(ex.image) for ex in t.test)
        assert all(len(ex.answers) == 10 for ex in t.test) and t.metric == "vqa"
    assert len(seq.captions) == paperdata.FLICKR and seq.captions[0].prompt == "Give a short description of the image."
    assert seq.lead_metrics == ("BLEU_1", "BLEU_4", "ROUGE_L")
    assert seq.train == {"budget": "paper-global", "epochs": 5, "batch_size": 128, "warmup": 0.0, "lr": 1e-5}


def test_sample_is_a_fixed_draw_in_file_order(root, tmp_path):
    """`sample: N` draws N of the kept questions at random, the same N every time, kept in file order."""
    recipe = yaml.safe_load((ROOT / "configs" / "sequences" / "paper-vqav2.yaml").read_text())
    recipe["tasks"] = recipe["tasks"][:1]
    recipe["tasks"][0]["train"]["sample"] = 5
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    every = load_sequence("paper-vqav2", data_root=root).tasks[0].train
    a, b = (load_sequence(path, data_root=root, seed=s).tasks[0].train for s in (0, 1))
    assert len(a) == 5 and [e.image for e in a] == [e.image for e in b]
    where = [next(i for i, e in enumerate(every) if e.image == x.image) for x in a]
    assert where == sorted(where) and where != list(range(5))  # a draw, not the first five
    recipe["tasks"][0]["train"]["limit"] = 3
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="not both"):
        load_sequence(path, data_root=root)


def test_bad_data_root_is_one_line_before_the_model_loads(root, tmp_path):
    out = tmp_path / "run"
    cases = [((), "give --data-root DIR"), (("--data-root", tmp_path / "nope"), "directory not found")]
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "vqav2" / "v2_mscoco_val2014_annotations.json").unlink()
    cases.append((("--data-root", broken), "v2_mscoco_val2014_annotations.json' not found"))
    gone = tmp_path / "gone"
    shutil.copytree(root, gone)
    next((gone / "coco" / "train2014").iterdir()).unlink()
    cases.append((("--data-root", gone), "not found in"))
    for extra, message in cases:
        r = _cli("--tasks", "paper-vqav2", "--output", out, *extra)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
        assert not out.exists()  # nothing written
    r = _cli("--tasks", "world", "--data-root", root, "--output", out)
    assert r.returncode == 2 and "has its paths relative to itself" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper-vqav2", "vqacl-10"])
def test_recipe_runs_end_to_end(root, recipe, tmp_path):
    """The one command on the fixture: steps from epochs and the effective batch (logged), the recipe's budget, and
    report.md leading with BLEU-1, BLEU-4 and ROUGE-L retention beside CIDEr's."""
    out = tmp_path / "run"
    r = _cli("--tasks", recipe, "--data-root", root, "--output", out, "--grad-accum", "4", "--eval-limit", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = math.ceil(paperdata.SIZES["train"] * 5 / 128)
    assert f"{steps} steps x batch 128 at lr 1e-05" in r.stdout and "paper-global.yaml" in r.stdout
    assert "5 epochs of 24 examples per task at effective batch 128 (32 per micro-batch x 4 accumulated" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["summary"]["caption_retention_by_metric"]) == ["BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"]
    assert m["lead_metrics"] == ["BLEU_1", "BLEU_4", "ROUGE_L"]
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("- **Caption retention by the sequence's lead metrics**")
    assert all(k in report[2] for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))


@pytest.mark.slow
def test_compare_runs_the_recipe(root, tmp_path):
    """experiments.compare passes --data-root, --grad-accum and the recipe's budget to every run."""
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "piece_mm.experiments.compare", "--model", "llava", "--tasks",
                        "paper-vqav2", "--data-root", str(root), "--methods", "piece-f,seqft", "--lrs", "1e-5",
                        "--seeds", "0", "--eval-limit", "2", "--grad-accum", "2", "--jobs", "1", "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary
    for m in ("piece-f", "seqft"):
        args = json.loads((out / "runs" / f"{m}-lr1e-05-seed0" / "run_args.json").read_text())["flags"]
        assert args["data_root"] == str(root) and args["grad_accum"] == 2
        metrics = json.loads((out / "runs" / f"{m}-lr1e-05-seed0" / "metrics.json").read_text())
        assert "caption_retention_by_metric" in metrics["summary"]


@pytest.mark.parametrize("train, message", [
    ("{lr: 1e-3, epochs: 2}", None),  # YAML 1.1 reads 1e-3 as a string: taken as the number it spells
    ("{epochs: 0}", "train.epochs is 0; expected a positive number"),
    ("{warmup: 1.5}", "train.warmup is 1.5; expected a number >= 0 and < 1"),
    ("{lr: fast}", "train.lr is 'fast'"),
    ("{epoch: 5}", "train: unknown field 'epoch'"),
    ("{budget: 3}", "train.budget is 3; expected a budget name"),
])
def test_train_section_is_checked(tmp_path, train, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"tasks:\n  - {{name: color, format: world}}\nworld: {{train_examples: 4, test_examples: 2}}\n"
                    f"general: {{captions: 2, vqa: 2}}\ntrain: {train}\n")
    if message is None:
        assert load_sequence(path).train == {"lr": 1e-3, "epochs": 2}
    else:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_sequence(path)
