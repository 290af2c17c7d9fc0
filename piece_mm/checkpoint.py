"""Crash-safe checkpoints of a continual run, for `--resume`.

A checkpoint is a directory `<output>/checkpoints/<n>/` with
- model.safetensors: every weight (safetensors, so loading runs no code);
- train.pt: optimizer and LR-scheduler state and the RNG states, read back with torch.load(weights_only=True);
- state.json: where the loop stands (task, step) and everything measured so far, plus the size and sha256 of the two
  files above, so a truncated or altered file is refused rather than half-loaded.
It is written under a temporary name and renamed into place, and only then does `<output>/checkpoint.json` (itself
replaced atomically) point to it; older checkpoints are removed after that. A kill at any moment leaves the pointer on
a complete checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from piece_mm import dist, shard
from piece_mm.errors import InputError

POINTER = "checkpoint.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_tensors(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """state_dict (or the one given) with tied weights stored once (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))


def _train_file(rank: int) -> str:
    """Each FSDP2 rank's optimizer state is its own shard's; under one process or data parallelism there is one."""
    return "train.pt" if rank == 0 else f"train-{rank}.pt"


def save(output: Path, state: dict, model, opt=None, sched=None, weights_unchanged: bool = False) -> Path:
    """Write a checkpoint of the run at `state` and point checkpoint.json to it. weights_unchanged: the weights are
    those of the latest checkpoint, which are then hard-linked rather than written (and hashed) again.

    On FSDP2 shards (piece_mm/shard.py) every process calls it: the weights are gathered whole to the first process,
    which writes them, and each process writes its own optimizer state (train-<rank>.pt)."""
    output = Path(output)
    root = output / "checkpoints"
    sharded = shard.is_fsdp(model)
    main = dist.is_main() or not sharded
    if main:
        root.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0) if main else None
    if sharded:
        number = dist.gather_objects(number)[0]
    tmp = root / f"{number}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    previous = _latest(output) if weights_unchanged else None
    files = {}
    if previous is not None:  # its size and hash were recorded when it was written
        if main:
            os.link(previous[1] / "model.safetensors", tmp / "model.safetensors")
        files["model.safetensors"] = previous[0]["files"]["model.safetensors"]
    else:
        whole = shard.full_state_dict(model)  # on shards a collective: every rank sends its part
        if main:
            save_file(_model_tensors(model, whole), str(tmp / "model.safetensors"))
    if sharded:
        dist.barrier()  # tmp exists before the other ranks write into it
    mine = _train_file(dist.rank() if sharded else 0)
    if main or sharded:
        torch.save({"optimizer": opt.state_dict() if opt is not None else None,
                    "scheduler": sched.state_dict() if sched is not None else None, "rng": rng_state()},
                   tmp / mine)
        with open(tmp / mine, "rb") as fh:
            os.fsync(fh.fileno())
    if sharded:
        dist.barrier()
    final = root / str(number)
    if main:
        names = ["model.safetensors"] + [_train_file(r) for r in range(dist.world() if sharded else 1)]
        for f in names:
            files.setdefault(f, {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)})
        (tmp / "state.json").write_text(json.dumps({**state, "files": files,
                                                    "shards": dist.world() if sharded else None}))
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.rename(final)
        pointer = output / POINTER
        pointer.with_suffix(".json.tmp").write_text(json.dumps({"checkpoint": f"checkpoints/{number}"}))
        os.replace(pointer.with_suffix(".json.tmp"), pointer)
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    if sharded:
        dist.barrier()  # no rank goes on (or is killed as done) before the checkpoint is in place
    return final


def _latest(output: Path) -> tuple[dict, Path] | None:
    """(state, dir) of the latest checkpoint this run wrote, unverified (it was hashed when written)."""
    pointer = Path(output) / POINTER
    if not pointer.exists():
        return None
    where = Path(output) / json.loads(pointer.read_text())["checkpoint"]
    return json.loads((where / "state.json").read_text()), where


def load(output: Path) -> tuple[dict, Path] | None:
    """(state, checkpoint dir) of the run in `output`, or None if it has no checkpoint. Anything unreadable, missing
    or not matching its recorded size / sha256 raises InputError naming the file."""
    pointer = Path(output) / POINTER
    if not pointer.exists():
        return None
    try:
        where = Path(output) / json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{pointer}: not a readable checkpoint pointer ({e})") from None
    path = where / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; the checkpoint is incomplete") from None
    except ValueError as e:
        raise InputError(f"{path}: malformed JSON ({e})") from None
    for f, meta in state.get("files", {}).items():
        p = where / f
        if not p.is_file():
            raise InputError(f"{p}: missing; the checkpoint is incomplete")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise InputError(f"{p}: {size} bytes; the checkpoint recorded {meta['bytes']} (truncated or altered)")
        if _sha256(p) != meta["sha256"]:
            raise InputError(f"{p}: sha256 differs from the one recorded at save time (corrupted)")
    return state, where


def restore(where: Path, model) -> dict:
    """Load the weights into `model` (strictly: every tensor, matching shapes) and return the training state
    (optimizer / scheduler state dicts, RNG). On FSDP2 shards each process reads only its shard's rows of the
    weights, and its own optimizer state; the run must have been sharded over as many processes."""
    path = where / "model.safetensors"
    sharded = shard.is_fsdp(model)
    saved = json.loads((where / "state.json").read_text()).get("shards")
    if saved != (dist.world() if sharded else None):  # each rank's optimizer state is its own shard's
        was = f"sharded over {saved} FSDP2 processes" if saved else "not sharded"
        now = f"{dist.world()} FSDP2 processes" if sharded else "no FSDP2"
        raise InputError(f"{where / 'state.json'}: the run was {was}; this one has {now}: resume it as it started")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            own = {k: (t.shape, t) for k, t in model.state_dict().items()}
            missing = [k for k in _model_tensors(model) if k not in names]
            bad = [k for k in names if k not in own or tuple(f.get_slice(k).get_shape()) != tuple(own[k][0])]
            if missing or bad:
                raise InputError(f"{path}: does not fit the model "
                                 f"({'missing ' + missing[0] if missing else 'unexpected ' + bad[0]})")

            def read(name, rows):
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
            shard.load_rows(model, read, names)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    train = where / _train_file(dist.rank() if sharded else 0)
    try:
        return torch.load(train, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle and zip errors have no common base)
        raise InputError(f"{train}: unreadable ({str(e).splitlines()[0] if str(e) else e})") from None


def remove(output: Path) -> None:
    """Drop the pointer first, then the checkpoints (a kill in between leaves no pointer to a half-deleted one)."""
    (Path(output) / POINTER).unlink(missing_ok=True)
    shutil.rmtree(Path(output) / "checkpoints", ignore_errors=True)
