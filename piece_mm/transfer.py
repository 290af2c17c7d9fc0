"""Small-to-large mask transfer within one model family: choose weights on a small model, use the choice on a larger
one (e.g. a 3-layer tiny LLaVA -> a 6-layer one).

- Layers map by relative depth: layer L of a stack of n_large maps to layer floor(L · n_small / n_large) of the same
  stack in the small model; tensors outside layer stacks (projector, norms, heads) map by name.
- Inside a mapped tensor positions map by relative position, dimension by dimension: large index j of a dimension
  maps to small index floor(j · S / L), so a wider tensor takes the small choice block-wise.
- The result keeps the per-component budget fractions, measured on the large model: k = floor(fraction × the large
  component's scorable elements). The fractions are those of the small mask (or the given budget). Mapped positions
  come first; when they are more than k (a deeper model maps each small layer to several), or fewer, a fixed
  random order per tensor decides, so the choice is spread evenly and is deterministic.
"""
from __future__ import annotations

import re
import zlib

import torch

from piece_mm.components import DEFAULT_EXCLUDE, split_components
from piece_mm.select import component_k, select_masks

_STACK = re.compile(r"^(.*\.(?:layers|blocks|layer|h))\.(\d+)\.(.*)$")


def _depths(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        m = _STACK.match(n)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)) + 1)
    return out


def _source(name: str, small_depth: dict, large_depth: dict) -> str:
    m = _STACK.match(name)
    if not m or m.group(1) not in small_depth:
        return name
    stack, layer, rest = m.group(1), int(m.group(2)), m.group(3)
    return f"{stack}.{layer * small_depth[stack] // large_depth[stack]}.{rest}"


def transfer_masks(masks: dict[str, torch.Tensor], small_model, large_model, budget: dict | None = None,
                   exclude=DEFAULT_EXCLUDE, rules: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks chosen on `small_model` -> masks for `large_model` ({name: sorted int64 flat indices}), as in the module
    docstring. Raises ValueError naming the tensor when a large tensor has no counterpart or its rank differs."""
    small = dict(small_model.named_parameters())
    large = dict(large_model.named_parameters())
    s_parts = split_components(small_model, exclude=exclude, rules=rules)
    l_parts = split_components(large_model, exclude=exclude, rules=rules)
    unknown = [n for n in masks if n not in small]
    if unknown:
        raise ValueError(f"transfer_masks: mask names {unknown[0]!r}, which the small model does not have")
    if budget is None:  # the small mask's own fraction of each component
        budget = {}
        for c, names in s_parts.items():
            n = sum(small[x].numel() for x in names)
            budget[c] = sum(masks[x].numel() for x in names if x in masks) / n if n else 0.0
    s_depth, l_depth = _depths(small), _depths(large)
    scores = {}
    for c, names in l_parts.items():
        for name in names:
            src = _source(name, s_depth, l_depth)
            if src not in small:
                raise ValueError(f"transfer_masks: large-model tensor {name!r} maps to {src!r}, which the small model "
                                 "does not have (transfer works within one model family)")
            S, L = small[src].shape, large[name].shape
            if len(S) != len(L):
                raise ValueError(f"transfer_masks: cannot map {src!r} {tuple(S)} onto {name!r} {tuple(L)}: "
                                 "different number of dimensions")
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            score = torch.rand(L, generator=g).mul_(0.5)  # the order among equals: random, fixed per tensor
            if src in masks and masks[src].numel():
                chosen = torch.zeros(S.numel(), dtype=torch.bool)
                chosen[masks[src]] = True
                chosen = chosen.view(S)
                for d, (s_d, l_d) in enumerate(zip(S, L)):  # relative position, one dimension at a time
                    chosen = chosen.index_select(d, torch.arange(l_d) * s_d // l_d)
                score += chosen.float()
            scores[name] = score
    out = select_masks(scores, l_parts, budget)
    for c, names in l_parts.items():  # k per component, measured on the large model
        k = component_k(float(budget.get(c, 0.0)), sum(large[n].numel() for n in names))
        assert sum(out[n].numel() for n in names if n in out) == k
    return out
