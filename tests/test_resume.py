import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _args(seq, out, *extra):
    from conftest import short_run_args
    return short_run_args(seq, out, *extra)


def _state(out: Path):
    try:
        where = out / json.loads((out / "checkpoint.json").read_text())["checkpoint"]
        return json.loads((where / "state.json").read_text())
    except (OSError, ValueError, KeyError):
        return None


def _wait_inside_task_2(proc, out: Path) -> None:
    """Return once the run's checkpoint is at step >= 4 of task 2; fail if the run ends first."""
    deadline = time.time() + 600
    while time.time() < deadline:
        st = _state(out)
        if st and st["task"] == 1 and st["in_task"] and st["step"] >= 4:
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be stopped inside task 2")
        time.sleep(0.02)


def _kill_inside_task_2(args, out: Path, env: dict) -> None:
    """Start the run and SIGKILL it once its checkpoint is at step >= 4 of task 2."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_inside_task_2(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, uninterrupted_run):
    """An uninterrupted run, and the same run killed with SIGKILL inside task 2 (a copy kept for corruption)."""
    tmp = tmp_path_factory.mktemp("resume")
    seq, whole = uninterrupted_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp / "killed"
    _kill_inside_task_2(_args(seq, killed), killed, env)
    assert not (killed / "metrics.json").exists()
    spare = tmp / "spare"
    shutil.copytree(killed, spare)
    return seq, whole, killed, spare, env


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_uninterrupted_result(runs):
    seq, whole, killed, _, env = runs
    cache = killed / "distill" / "2-shape.teacher.safetensors"  # the task-2 teacher's cache, written before step 1
    written = cache.stat().st_mtime_ns
    r = subprocess.run(_args(seq, killed, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    assert "teacher cache:" not in r.stdout and cache.stat().st_mtime_ns == written  # read back, not recomputed
    assert cache.read_bytes() == (whole / "distill" / "2-shape.teacher.safetensors").read_bytes()
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("scores", "general", "summary", "trainable", "selection", "mask_jaccard"):
        assert a[key] == b[key], key
    for f in ("deltas/1-color.safetensors", "deltas/2-shape.safetensors", "masks/2-shape.safetensors"):
        assert (whole / f).read_bytes() == (killed / f).read_bytes(), f  # bit-identical tuned values
    assert not (killed / "checkpoint.json").exists()  # finished: checkpoints are removed
    again = subprocess.run(_args(seq, killed, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "nothing to resume" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_refused_in_one_line(runs, tmp_path, damage):
    seq, _, _, spare, env = runs
    out = tmp_path / "run"
    shutil.copytree(spare, out)
    where = out / json.loads((out / "checkpoint.json").read_text())["checkpoint"]
    model = where / "model.safetensors"
    data = bytearray(model.read_bytes())
    if damage == "truncate":
        model.write_bytes(data[: len(data) // 2])
    else:
        data[-100] ^= 0xFF
        model.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = subprocess.run(_args(seq, out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


@pytest.mark.slow
def test_an_unfinished_run_needs_resume_and_the_same_flags(runs, tmp_path):
    seq, _, _, spare, env = runs
    out = tmp_path / "run"
    shutil.copytree(spare, out)
    r = subprocess.run(_args(seq, out), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(_args(seq, out, "--resume", "--lr", "0.5"), capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 2 and "lr" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_checkpoint_with_unchanged_weights_links_them(tmp_path):
    import torch

    from piece_mm import checkpoint
    lin = torch.nn.Linear(3, 2)
    first = checkpoint.save(tmp_path, {"step": 1}, lin)
    inode = (first / "model.safetensors").stat().st_ino
    second = checkpoint.save(tmp_path, {"step": 2}, lin, weights_unchanged=True)
    assert not first.exists() and (second / "model.safetensors").stat().st_ino == inode  # linked, not rewritten
    state, where = checkpoint.load(tmp_path)  # size and sha256 still verify
    assert state["step"] == 2 and where == second
    other = torch.nn.Linear(3, 2)
    checkpoint.restore(where, other)
    assert torch.equal(other.weight, lin.weight) and torch.equal(other.bias, lin.bias)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ewc", "lwf", "replay", "trace", "seqlora", "olora", "migu"])
def test_baselines_resume_to_the_uninterrupted_result(method, tmp_path):
    """Killed inside task 2 and resumed, methods with state of their own (EWC's Fisher, LwF's teacher, replay's
    sample, TRACE's sketches, the LoRA adapters, MIGU's hooks) end with the uninterrupted run's metrics."""
    from conftest import SHORT_SEQ
    seq = tmp_path / "two.yaml"
    seq.write_text(SHORT_SEQ)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the uninterrupted run on one core while the other is killed and resumed on the other (one thread each)
    uninterrupted = subprocess.Popen(_args(seq, whole, "--method", method), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
    _kill_inside_task_2(_args(seq, killed, "--method", method), killed, env)
    r = subprocess.run(_args(seq, killed, "--method", method, "--resume"), capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    _, err = uninterrupted.communicate(timeout=900)
    assert uninterrupted.returncode == 0, err[-2000:]
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("scores", "general", "summary", "trainable"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume_from_anywhere(uninterrupted_run, tmp_path):
    """SIGINT inside task 2: exit 130, a short stderr ending in the resume command; that command, run from another
    working directory with no other flag, finishes with the uninterrupted run's metrics."""
    seq, whole = uninterrupted_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    start = tmp_path / "started-here"
    start.mkdir()
    # SIGINT as a terminal's Ctrl-C delivers it: a test run in the background may have inherited it ignored
    proc = subprocess.Popen(_args(seq.resolve(), Path("..") / "run"), cwd=start, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_inside_task_2(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) <= 3, err
    assert "Traceback" not in err
    cmd = lines[-1].split("continue with: ")[1]
    assert cmd == f"python -m piece_mm.train --resume {out.resolve()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shlex
    import sys
    argv = shlex.split(cmd)
    r = subprocess.run([sys.executable, *argv[1:]], cwd=elsewhere, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in ("scores", "general", "summary", "trainable", "selection", "mask_jaccard"):
        assert a[key] == b[key], key
    assert not list(elsewhere.iterdir())  # nothing written where the resume was called from


def test_resume_dir_without_run_args_is_one_line(tmp_path):
    from piece_mm.train import main
    r = main(["--resume", str(tmp_path)])
    assert r == 2


def test_a_budget_field_added_later_at_its_default_is_no_change(tmp_path):
    """A run saved before a budget field existed resumes when the field is at its default, and not otherwise."""
    from piece_mm.continual import check_resume
    from piece_mm.errors import InputError
    from piece_mm.select import load_budget

    now = {"model": "llava", "budget": load_budget("default")}
    old = {k: v for k, v in now["budget"].items() if k != "score_memory"}
    check_resume({"config": {"model": "llava", "budget": old}}, now, tmp_path)
    changed = {**now, "budget": {**now["budget"], "score_memory": "host"}}
    with pytest.raises(InputError, match="was started with budget"):
        check_resume({"config": {"model": "llava", "budget": old}}, changed, tmp_path)


def test_a_nested_budget_field_added_later_at_its_default_is_no_change(tmp_path):
    """The same one level down: a run saved before distill.held.crops existed resumes with crops at 0, not at 0.5."""
    import copy

    from piece_mm.continual import check_resume
    from piece_mm.errors import InputError
    from piece_mm.select import load_budget

    now = {"model": "llava", "budget": load_budget("default")}
    old = copy.deepcopy(now["budget"])
    del old["distill"]["held"]["crops"]
    check_resume({"config": {"model": "llava", "budget": old}}, now, tmp_path)
    changed = copy.deepcopy(now)
    changed["budget"]["distill"]["held"]["crops"] = 0.5
    with pytest.raises(InputError, match="was started with budget"):
        check_resume({"config": {"model": "llava", "budget": old}}, changed, tmp_path)
    other = copy.deepcopy(now)
    other["budget"]["distill"]["held"]["weight"] = 1.0  # a field the run did have still counts
    with pytest.raises(InputError, match="was started with budget"):
        check_resume({"config": {"model": "llava", "budget": old}}, other, tmp_path)


def test_the_embedded_clip_from_another_checkout_is_no_change(tmp_path):
    """A run started from another copy of piece_mm (its embedded CLIP at another path) resumes; another CLIP does
    not."""
    from piece_mm.continual import check_resume
    from piece_mm.errors import InputError

    saved = {"config": {"model": "llava", "clip": "/tmp/copy/piece_mm/checkpoints/clip-world"}}
    check_resume(saved, {"model": "llava", "clip": "/work/main/piece_mm/checkpoints/clip-world"}, tmp_path)
    with pytest.raises(InputError, match="was started with clip"):
        check_resume(saved, {"model": "llava", "clip": "/models/clip-vit-b32"}, tmp_path)
