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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tasks.errors import InputError

POINTER = "checkpoint.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_tensors(model) -> dict[str, torch.Tensor]:
    """state_dict with tied weights stored once (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
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


def save(output: Path, state: dict, model, opt=None, sched=None, weights_unchanged: bool = False) -> Path:
    """Write a checkpoint of the run at `state` and point checkpoint.json to it. weights_unchanged: the weights are
    those of the latest checkpoint, which are then hard-linked rather than written (and hashed) again."""
    output = Path(output)
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    tmp = root / f"{number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = _latest(output) if weights_unchanged else None
    files = {}
    if previous is not None:  # its size and hash were recorded when it was written
        os.link(previous[1] / "model.safetensors", tmp / "model.safetensors")
        files["model.safetensors"] = previous[0]["files"]["model.safetensors"]
    else:
        save_file(_model_tensors(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None, "rng": rng_state()},
               tmp / "train.pt")
    for f in ("model.safetensors", "train.pt"):
        files.setdefault(f, {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)})
    (tmp / "state.json").write_text(json.dumps({**state, "files": files}))
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / str(number)
    tmp.rename(final)
    pointer = output / POINTER
    pointer.with_suffix(".json.tmp").write_text(json.dumps({"checkpoint": f"checkpoints/{number}"}))
    os.replace(pointer.with_suffix(".json.tmp"), pointer)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
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
    (optimizer / scheduler state dicts, RNG)."""
    try:
        tensors = load_file(str(where / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{where / 'model.safetensors'}: unreadable ({str(e).splitlines()[0]})") from None
    own = model.state_dict()
    missing = [k for k in _model_tensors(model) if k not in tensors]
    bad = [k for k, t in tensors.items() if k not in own or own[k].shape != t.shape]
    if missing or bad:
        raise InputError(f"{where / 'model.safetensors'}: does not fit the model "
                         f"({'missing ' + missing[0] if missing else 'unexpected ' + bad[0]})")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    try:
        return torch.load(where / "train.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle and zip errors have no common base)
        raise InputError(f"{where / 'train.pt'}: unreadable ({str(e).splitlines()[0] if str(e) else e})") from None


def remove(output: Path) -> None:
    """Drop the pointer first, then the checkpoints (a kill in between leaves no pointer to a half-deleted one)."""
    (Path(output) / POINTER).unlink(missing_ok=True)
    shutil.rmtree(Path(output) / "checkpoints", ignore_errors=True)
