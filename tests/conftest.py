import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(scope="session", params=["llava", "qwen2-vl"])
def tiny(request):
    """(alias, model, processor) for each embedded tiny checkpoint."""
    from piece_mm.models import load_model
    model, processor = load_model(request.param)
    return request.param, model, processor


SHORT_SEQ = ("tasks:\n  - {name: color, format: world}\n  - {name: shape, format: world}\n"
             "world: {train_examples: 32, test_examples: 8}\ngeneral: {captions: 6, vqa: 6}\n")


def short_run_args(seq, out, *extra):
    """A two-task CLI run, short but long enough to be killed inside task 2 (checkpoints every 2 of 40 steps)."""
    import sys
    return [sys.executable, "-m", "piece_mm.train", "--model", "llava", "--tasks", str(seq), "--max-steps", "40",
            "--batch-size", "4", "--eval-limit", "4", "--checkpoint-every", "2", "--output", str(out), *extra]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """(sequence YAML, output dir) of one uninterrupted short run, one thread: the reference for resume and for
    several processes."""
    import os
    import subprocess
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("short")
    seq = tmp / "two.yaml"
    seq.write_text(SHORT_SEQ)
    r = subprocess.run(short_run_args(seq, tmp / "whole"), capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return seq, tmp / "whole"
