"""Real data formats (LLaVA-JSON, VQA-v2, HF datasets, COCO / Karpathy captions), their validation, CLIPScore and
SPICE. The data are small fixtures written by tests/realdata.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import realdata
import torch

from piece_mm.errors import InputError
from piece_mm.tasks import base, hf_dataset
from piece_mm.tasks.coco import load_karpathy
from piece_mm.tasks.sequence import load_sequence

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("realdata")
    realdata.make(root)
    return root


@pytest.fixture
def data(data_root, tmp_path):
    """A private copy of the fixtures, free to break."""
    shutil.copytree(data_root, tmp_path / "d")
    return tmp_path / "d"


# ---------------------------------------------------------------------------------------------------------------------
# loaders

def test_mixed_sequence_loads_every_format(data_root):
    seq = load_sequence(data_root / "mixed.yaml")
    sqa, count, mine, color = seq.tasks
    assert [t.metric for t in seq.tasks] == ["exact", "vqa", "exact", "exact"]
    # llava-json: multi-turn records keep their earlier turns; <image> at the end puts the picture after the text
    multi = sqa.train[1]
    scene = realdata._scenes()[1]
    assert multi.history == (("describe the image", scene.phrase()),) and not multi.image_first
    assert (multi.prompt, multi.answer) == ("what color are the shapes", scene.color)
    assert sqa.train[0].image_first and sqa.train[0].history == ()
    assert sqa.train[-1].image is None and sqa.train[-1].answer == "rojo"  # the text-only record
    assert len(sqa.test) == 8
    # vqa-v2: only the count and color groups' question types; the target is the most common answer
    prompts = {ex.prompt for ex in count.train}
    assert prompts == {"how many shapes are there", "what color is the shape"}
    assert all(ex.answer == base.most_common_answer(ex.answers) and len(ex.answers) == 10 for ex in count.train)
    # hf-dataset (save_to_disk) and the general caption set
    assert len(mine.train) == 16 and len(mine.test) == 8 and mine.train[0].image.size == (64, 64)
    assert len(color.train) == 48 and seq.general_format == "coco-captions" and seq.vqa == []
    assert len(seq.captions) == realdata.N_IMAGES and all(len(ex.refs) == 3 for ex in seq.captions)


def test_hf_parquet_and_imagefolder(data_root):
    rows = hf_dataset.load(data_root / "hf_parquet" / "data.parquet", None, {}, "t")
    assert len(rows) == 16 and rows[3].answer == realdata.world.COUNT_WORDS[realdata._scenes()[3].count]
    folder = hf_dataset.load(data_root / "hf_folder", "train", {"question": "q", "answer": "a"}, "t")
    assert len(folder) == 8 and folder[0].prompt == "how many shapes are there" and folder[0].image.size == (64, 64)
    with pytest.raises(ValueError, match="column 'question'.*not in"):
        hf_dataset.load(data_root / "hf_folder", "train", {}, "t")


def test_karpathy_test_split(data_root):
    caps = load_karpathy(data_root / "karpathy.json", data_root / "images")
    scenes = realdata._scenes()
    assert len(caps) == 8 and [ex.refs for ex in caps] == [tuple(s.captions()[:3]) for s in scenes[16:]]


def test_metrics_against_their_definitions():
    answers = ["two", "two", "2", "two", "three", "3", "three", "two", "two", "Two"]
    assert base.vqa_accuracy("two", answers) == 1.0  # seven annotators ("2" is "two"): min(7 / 3, 1)
    assert base.vqa_accuracy("3", answers) == 1.0 and base.vqa_accuracy("Three.", answers) == 1.0  # three of them
    assert base.vqa_accuracy("four", answers) == 0.0
    assert base.vqa_accuracy("red", ["red", "Red", "blue"] + ["dark red"] * 7) == pytest.approx(2 / 3)
    assert base.vqa_accuracy("don't know", ["dont know"]) == pytest.approx(1 / 3)
    assert base.most_common_answer(answers) == "two"
    ex = base.Example(None, "q", "red")
    assert base.METRICS["contains"]("it is red.", ex) == 1.0 and base.METRICS["contains"]("reddish", ex) == 0.0
    assert base.METRICS["exact"]("The red", ex) == 1.0 and base.METRICS["exact"]("it is red", ex) == 0.0


def test_collate_trains_every_assistant_turn(tiny, data_root):
    """Labels cover exactly the assistant replies (each with its end-of-turn), in every turn, for both families;
    a text-only example shares the batch with pictured ones."""
    from piece_mm.batching import IGNORE_INDEX, collate

    _, model, processor = tiny
    sqa = load_sequence(data_root / "mixed.yaml").tasks[0]
    exs = [sqa.train[0], sqa.train[1], sqa.train[-1]]
    batch = collate(processor, exs)
    tok = processor.tokenizer
    for i, ex in enumerate(exs):
        lab = batch["labels"][i]
        trained = tok.decode(lab[lab != IGNORE_INDEX], skip_special_tokens=True).split()
        replies = [a for _, a in ex.history] + [ex.answer]
        assert trained == " ".join(replies).split()
    assert batch["input_ids"].shape[0] == 3
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------------------------------------------------------------
# validation: one line, exit 2, nothing in the output dir touched

def _llava_records(d):
    return json.loads((d / "llava" / "train.json").read_text())


def _edit_yaml(d, old, new, name="mixed.yaml"):
    p = d / name
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new))


def _rewrite(path, fn):
    path.write_text(fn(path.read_text()))


def _drop_annotation(d):
    a = json.loads((d / "vqa" / "a_train.json").read_text())
    gone = a["annotations"].pop(4)
    (d / "vqa" / "a_train.json").write_text(json.dumps(a))
    return str(gone["question_id"])


def _drop_conversations(d):
    recs = [r if i != 2 else {"id": "l2", "image": r["image"]} for i, r in enumerate(_llava_records(d))]
    text = json.dumps(recs, indent=1)
    (d / "llava" / "train.json").write_text(text)
    lines = text.splitlines()
    opening = lines.index('  "id": "l2",') - 1  # the record's "{" (0-based)
    assert lines[opening] == " {"
    return f"line {opening + 1})"


CASES = {
    "yaml missing": (lambda d: (d / "mixed.yaml").unlink(), ["mixed.yaml", "not found"]),
    "yaml syntax": (lambda d: (d / "mixed.yaml").write_text("tasks: [\n  - {name: x\n"), ["mixed.yaml",
                                                                                          "not valid YAML", "line"]),
    "unknown format": (lambda d: _edit_yaml(d, "format: llava-json", "format: llava-jsn"),
                       ["tasks[0].format", "llava-jsn"]),
    "required key missing": (lambda d: _edit_yaml(d, "annotations: vqa/a_train.json, ", ""),
                             ["tasks[1].train", "'annotations'"]),
    "data file missing": (lambda d: (d / "llava" / "train.json").unlink(), ["tasks[0].train.data", "train.json",
                                                                            "not found"]),
    "malformed json": (lambda d: _rewrite(d / "llava" / "train.json", lambda t: t[:-40]),
                       ["train.json", "not valid JSON", "line"]),
    "bad jsonl line": (lambda d: (d / "llava" / "test.jsonl").write_text(
        "\n".join((d / "llava" / "test.jsonl").read_text().splitlines()[:2] + ['{"id": "x", "conversations": ['])),
        ["test.jsonl", "line 3"]),
    "record missing conversations": (_drop_conversations, ["train.json", "records[2]", "'l2'", "'conversations'"]),
    "record missing image": (lambda d: (d / "llava" / "train.json").write_text(json.dumps(
        [r if i != 3 else {"id": "l3", "conversations": r["conversations"]} for i, r in enumerate(_llava_records(d))])),
        ["train.json", "records[3]", "'l3'", "'image'"]),
    "image file missing": (lambda d: (d / "images" / realdata.image_name(0)).unlink(),
                           [realdata.image_name(0), "not found"]),
    "corrupt image": (lambda d: (d / "images" / realdata.image_name(1)).write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
                      [realdata.image_name(1), "not a readable image"]),
    "empty split": (lambda d: (d / "llava" / "test.jsonl").write_text(""), ["tasks[0].test", "empty"]),
    "vqa question without annotation": (_drop_annotation, ["q_train.json", "question_id", "no annotation"]),
    "unknown question-type group": (lambda d: _edit_yaml(d, "question_types: [count, color]",
                                                         "question_types: [count, colour]"),
                                    ["tasks[1].question_types", "'colour'"]),
    "caption image id not listed": (lambda d: _rewrite(d / "captions.json",
                                                       lambda t: t.replace('"image_id": 5,', '"image_id": 999,')),
                                    ["captions.json", "annotations[", "image_id", "999"]),
}


def _main(argv, capsys):
    from piece_mm.train import main
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(case, data, tmp_path, capsys):
    breaks, expected = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    got = breaks(data)
    rc, err = _main(["--model", "llava", "--tasks", str(data / "mixed.yaml"), "--output", str(out)], capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for s in expected + ([got] if isinstance(got, str) else []):
        assert s in err, (s, err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier results"


@pytest.mark.parametrize("budget, expected", [("fractions: {vision: 0.0, llm: 1.5}\n", ["fractions.llm", "1.5"]),
                                              ("fractions: {audio: 0.1, llm: 0.01}\n", ["fractions", "audio"])])
def test_bad_budget_one_line_exit_2(budget, expected, tmp_path, capsys):
    (tmp_path / "b.yaml").write_text(budget)
    (tmp_path / "s.yaml").write_text("tasks: [{name: color}]\nworld: {train_examples: 4, test_examples: 4}\n")
    rc, err = _main(["--tasks", str(tmp_path / "s.yaml"), "--budget", str(tmp_path / "b.yaml"), "--output",
                     str(tmp_path / "o")], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and all(s in err for s in expected + ["b.yaml"]), err
    assert not (tmp_path / "o").exists()


def test_cli_subprocess_bad_input_has_no_traceback(data):
    (data / "llava" / "test.jsonl").write_text("{not json\n")
    r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--tasks", str(data / "mixed.yaml"), "--output",
                        str(data / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "test.jsonl: line 1" in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# CLIPScore and SPICE

@pytest.fixture(scope="module")
def world_clip():
    from piece_mm.eval.clipscore import load_clip
    return load_clip()


def test_clipscore_prefers_matching_captions(world_clip):
    """On held-out world scenes, a caption scores higher with its own image than with another's."""
    from piece_mm.tasks import world
    exs = world.caption_set(world.HELDOUT_CAPTION_SEED, 200, prompt=world.CAPTION_EVAL_PROMPT)
    images, caps = [ex.image for ex in exs], [ex.answer for ex in exs]
    shuffled = caps[7:] + caps[:7]
    keep = torch.tensor([a != b for a, b in zip(caps, shuffled)])  # identical captions cannot be ordered
    matched, other = world_clip.pairs(images, caps)[keep], world_clip.pairs(images, shuffled)[keep]
    assert (matched - other).mean() > 0
    assert (matched > other).float().mean() > 0.9


def test_clipscore_formula(world_clip):
    """CLIPScore = 2.5 max(cos, 0) with the "A photo depicts" prompt; RefCLIPScore = harmonic mean with the best
    reference cosine: computed here from the open_clip model directly."""
    from piece_mm.tasks import world
    exs = world.caption_set(5, 6, prompt=world.CAPTION_EVAL_PROMPT)
    cands = ["a small red circle on the left", "two big blue squares at the top", "", "a", "yes", "circle"]
    refs = [ex.refs for ex in exs]
    m, tok = world_clip.model, world_clip.tokenizer
    with torch.no_grad():
        img = torch.stack([world_clip.preprocess(ex.image) for ex in exs])
        e_i = torch.nn.functional.normalize(m.encode_image(img), dim=-1)
        def enc(ts):
            return torch.nn.functional.normalize(m.encode_text(tok(["A photo depicts " + t for t in ts])), dim=-1)
        e_c = enc(cands)
    clip = [2.5 * max(float(e_i[k] @ e_c[k]), 0.0) for k in range(6)]
    best = [max(max(float(e_c[k] @ r) for r in enc(list(refs[k]))), 0.0) for k in range(6)]
    ref = [2 * c * b / (c + b) if c + b > 0 else 0.0 for c, b in zip(clip, best)]
    got = world_clip.score([ex.image for ex in exs], cands, refs)
    assert got["CLIPScore"] == pytest.approx(sum(clip) / 6, abs=1e-5)
    assert got["RefCLIPScore"] == pytest.approx(sum(ref) / 6, abs=1e-5)


def test_load_clip_errors(tmp_path):
    from piece_mm.eval.clipscore import load_clip
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "open_clip_config.json").write_text('{"model_cfg": {}}')
    for kwargs, msg in [({"model": "ViT-Q-99", "weights": None}, "not an open_clip architecture"),
                        ({"model": "ViT-B-32", "weights": None}, "needs --clip-weights"),
                        ({"model": "ViT-B-32", "weights": str(tmp_path / "none.pt")}, "file not found"),
                        ({"model": str(tmp_path), "weights": None}, "open_clip_config.json"),
                        ({"model": str(cfg_only), "weights": None}, "no weights file")]:
        with pytest.raises(InputError, match=msg):
            load_clip(**kwargs)


@pytest.mark.parametrize("with_fake_jars", [False, True])
def test_spice_skips_with_one_warning(with_fake_jars, tmp_path, monkeypatch, capsys):
    """No CoreNLP jars (or jars that cannot run): one warning line, the other metrics still there, no download."""
    import piece_mm.eval.captioning as cap
    monkeypatch.setattr(cap, "_spice_warned", False)
    monkeypatch.delenv(cap.CORENLP_ENV, raising=False)
    if cap.corenlp_dir() is not None:
        pytest.skip("this machine has the CoreNLP jars")
    if with_fake_jars:
        for j in cap.CORENLP_JARS:
            (tmp_path / j).write_bytes(b"not a jar")
        monkeypatch.setenv(cap.CORENLP_ENV, str(tmp_path))
    monkeypatch.setattr("urllib.request.urlretrieve", lambda *a, **k: pytest.fail("SPICE tried a download"))
    got = cap.caption_scores(["a small red circle"], [["a small red circle on the left"]], spice=True)
    assert "SPICE" not in got and got["CIDEr"] >= 0 and "BLEU_4" in got
    cap._warn_spice("again")  # later evaluations of the same run stay quiet
    err = capsys.readouterr().err
    assert err.count("warning: SPICE skipped") == 1 and err.strip().count("\n") == 0, err
    assert ("Error running SPICE" if with_fake_jars else "no Stanford CoreNLP") in err


# ---------------------------------------------------------------------------------------------------------------------
# end to end

@pytest.mark.slow
@pytest.mark.parametrize("yaml_name, steps, limit", [("mixed.yaml", 20, 16), ("mixed-karpathy.yaml", 4, 8)])
def test_real_formats_end_to_end(yaml_name, steps, limit, data_root, tmp_path):
    """llava-json, vqa-v2, hf-dataset and world tasks with a coco-captions general set (the issue's command), and a
    shorter run with a karpathy general set: a valid metrics.json with CLIPScore, and SPICE skipped in one line."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", "llava", "--tasks",
                        str(data_root / yaml_name), "--max-steps", str(steps), "--eval-limit", str(limit),
                        "--clip-model", str(ROOT / "piece_mm" / "checkpoints" / "clip-world"), "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PIECE_MM_CORENLP": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    seq = load_sequence(data_root / yaml_name)
    T = len(seq.tasks)
    assert m["tasks"] == [t.name for t in seq.tasks] and m["task_metrics"] == [t.metric for t in seq.tasks]
    assert len(m["scores"]) == T + 1
    assert all(len(row) == T and all(0.0 <= x <= 1.0 for x in row) for row in m["scores"])
    for g in [m["general"]["before"], *m["general"]["after"]]:
        assert {"BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CLIPScore", "RefCLIPScore"} <= set(g) and "VQA" not in g
    assert len(m["general"]["after"]) == T and 0.0 <= m["summary"]["caption_retention"]
    assert r.stderr.count("warning: SPICE skipped") == 1


def test_the_world_clip_is_trained_with_clipscores_own_prefix():
    """The zoo reads the prefix from configs/models/clip-world.yaml (it imports nothing of eval); CLIPScore must score
    with the prefix the CLIP was trained on."""
    from piece_mm.eval.clipscore import PROMPT
    from piece_mm.zoo import model_config
    assert model_config("clip-world")["text_prefix"] == PROMPT
