import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_unknown_model_one_line_exit_2(tmp_path):
    r = _run("piece_mm.train", "--model", "no-such-model", "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no-such-model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_missing_sequence_and_bad_flag(tmp_path):
    r = _run("piece_mm.train", "--tasks", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr and r.stderr.strip().count("\n") == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: color, format: world}\nworld: {train_examples: -3}\n")
    r = _run("piece_mm.train", "--tasks", str(bad), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "world.train_examples" in r.stderr and "-3" in r.stderr
    r = _run("piece_mm.train", "--max-steps", "0", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "--max-steps" in r.stderr


def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    r = _run("piece_mm.train", "--output", str(out))
    assert r.returncode == 2 and "metrics.json" in r.stderr
    assert (out / "metrics.json").read_text() == '{"keep": true}'


def test_short_run_writes_metrics_in_the_schema(tmp_path):
    seq = tmp_path / "two.yaml"
    seq.write_text("tasks:\n  - {name: color, format: world}\n  - {name: shape, format: world}\n"
                   "world: {train_examples: 16, test_examples: 8}\ngeneral: {captions: 6, vqa: 6}\n")
    out = tmp_path / "run"
    r = _run("piece_mm.train", "--model", "qwen2-vl", "--tasks", str(seq), "--max-steps", "2", "--batch-size", "4",
             "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"model", "method", "seed", "tasks", "scores", "general", "summary", "trainable", "time_s"}
    assert m["model"] == "qwen2-vl" and m["method"] == "seqft" and m["seed"] == 0
    assert m["tasks"] == ["color", "shape"]
    assert len(m["scores"]) == 3 and all(len(row) == 2 for row in m["scores"])
    assert all(0.0 <= v <= 1.0 for row in m["scores"] for v in row)
    keys = {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "VQA"}
    assert keys <= set(m["general"]["before"]) and len(m["general"]["after"]) == 2
    assert all(keys <= set(a) for a in m["general"]["after"])
    assert set(m["summary"]) == {"OP", "BWT", "FWT", "caption_retention"}
    R = m["scores"]
    assert m["summary"]["OP"] == pytest.approx(sum(R[2]) / 2)
    assert m["summary"]["caption_retention"] == pytest.approx(
        m["general"]["after"][-1]["CIDEr"] / m["general"]["before"]["CIDEr"])
    t = m["trainable"]
    assert set(t) == {"vision", "projector", "llm", "total"} and t["total"] == t["vision"] + t["projector"] + t["llm"]
    assert min(t["vision"], t["projector"], t["llm"]) > 0
    for f in ("report.md", "score_matrix.png", "cider.png", "model/config.json"):
        assert (out / f).is_file(), f
    # the saved final model is a checkpoint the standalone retention check can read
    r = _run("eval.captioning", "--model", str(out / "model"), "--baseline", "qwen2-vl", "--eval-limit", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CIDEr" in r.stdout and "retention" in r.stdout


def test_captioning_cli_bad_data_exit_2(tmp_path):
    bad = tmp_path / "caps.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "caption": "x"}]}')
    r = _run("eval.captioning", "--model", "llava", "--data", str(bad), "--images", str(tmp_path))
    assert r.returncode == 2 and "image_id" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _run("eval.captioning", "--model", "llava", "--eval-limit", "0")
    assert r.returncode == 2 and "--eval-limit" in r.stderr and r.stderr.strip().count("\n") == 0
