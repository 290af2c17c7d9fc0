import os

import pytest
import torch

torch.set_flush_denormal(True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # CI runs the slow tests two at a time (pytest-xdist, one worker per core). One thread per worker and per process
    # it starts: a second thread would only wait on the other worker's core (OpenMP threads spin while they wait).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest slow files first, so that under xdist (one file per worker, in this order: --no-loadscope-reorder) no
# long file starts last and runs alone.
LONGEST_FIRST = ("test_e2e_slow.py", "test_resume.py", "test_fsdp.py", "test_cli.py", "test_baselines.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
