"""Masks and sparse task deltas as safetensors files.

A delta holds, per tuned parameter, the flat indices of its selected elements and their values after the task.
Values rather than differences: assignment reproduces the tuned weights bit for bit, where base + (new − base) can
be off by a rounding step."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from piece_mm import shard
from piece_mm.errors import InputError

_IDX, _VAL = "::indices", "::values"


def _atomic_save(tensors: dict, path: Path, metadata: dict | None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def save_masks(masks: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    _atomic_save({n: idx.to(torch.int64).contiguous().cpu() for n, idx in masks.items()}, path, metadata)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    masks = _load(path)
    for n, idx in masks.items():
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise InputError(f"{path}: mask {n!r} is {idx.dtype} with shape {tuple(idx.shape)}; "
                             "expected 1-D int64 flat indices")
    return masks


def save_delta(model, masks: dict[str, torch.Tensor], path: Path, metadata: dict | None = None,
               values: dict[str, torch.Tensor] | None = None) -> None:
    """The current values of the masked elements of `model` (call it after tuning the task). `values` gives them
    instead, in each mask's order. `metadata` ({str: str}): safetensors writes it as a map in no fixed order, so a
    file is byte-for-byte reproducible only with one key (the loop writes one JSON string, under "piece_mm").
    On FSDP2 shards this is a collective: every process calls it, each sends the values inside its shard, and the
    first process writes the file."""
    if values is None and shard.is_fsdp(model):
        values = shard.gather_values(model, masks)
        if values is None:  # not the first process
            return
    params = dict(model.named_parameters())
    tensors = {}
    for n, idx in masks.items():
        idx = idx.to(torch.int64).cpu()
        tensors[n + _IDX] = idx.contiguous()
        vals = values[n] if values is not None else params[n].detach().reshape(-1).cpu()[idx]
        tensors[n + _VAL] = vals.contiguous()
    _atomic_save(tensors, path, metadata)


def load_delta(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{param name: (flat indices int64, values)}."""
    raw = _load(path)
    delta = {}
    for key, t in raw.items():
        if key.endswith(_IDX):
            n = key[: -len(_IDX)]
            if n + _VAL not in raw:
                raise InputError(f"{path}: {key!r} has no matching {n + _VAL!r}")
            vals = raw[n + _VAL]
            if t.dtype != torch.int64 or t.dim() != 1 or vals.shape != t.shape:
                raise InputError(f"{path}: {n!r} has indices {t.dtype}{tuple(t.shape)} and values "
                                 f"{tuple(vals.shape)}; expected matching 1-D int64 indices and values")
            delta[n] = (t, vals)
        elif not key.endswith(_VAL):
            raise InputError(f"{path}: unexpected tensor {key!r}; expected '<param>{_IDX}' / '<param>{_VAL}'")
    return delta


@torch.no_grad()
def apply_delta(model, delta: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write a delta's values into the model in place (deltas of a sequence are applied in task order)."""
    params = dict(model.named_parameters())
    for n, (idx, vals) in delta.items():
        if n not in params:
            raise InputError(f"delta: parameter {n!r} is not in the model")
        p = params[n]
        if idx.numel() and (idx.min() < 0 or idx.max() >= p.numel()):
            raise InputError(f"delta: indices for {n!r} fall outside its {p.numel()} elements")
        if not p.is_contiguous():
            raise InputError(f"delta: parameter {n!r} is not contiguous")
        p.data.view(-1).index_copy_(0, idx.to(p.device), vals.to(device=p.device, dtype=p.dtype))
