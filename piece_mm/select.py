"""Top-k selection of weights from importance scores: per component (default), over one global pool, or per
component with the total split among them by the task's own scores (pool "auto")."""
from __future__ import annotations

import math
from collections import Counter

import torch

from piece_mm import dist
from piece_mm.budget import GRANULARITIES, Budget
from piece_mm.components import COMPONENTS, layer_of
from piece_mm.errors import InputError


def _order_key(t: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (NaN refused), so a threshold can be found by bisection
    over integers without concatenating a component's scores."""
    if torch.isnan(t).any():
        raise ValueError("select_masks: scores contain NaN")
    i = t.float().contiguous().view(torch.int32).view(-1)  # [numel]; int32 keeps the keys as small as the scores
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)  # negative floats: reverse their bit order, sign bit kept


def _top_k(scores: dict[str, torch.Tensor], names: list[str], k: int,
           shards: dict | None = None) -> dict[str, torch.Tensor]:
    """The k largest elements over the tensors `names`. Ties at the threshold go to the earlier parameter in `names`,
    then to the lower flat index, so the result is deterministic. Returns {name: sorted int64 flat indices}.

    shards ({name: parameter}, FSDP2 DTensors): each score tensor is this rank's shard of the parameter's scores.
    The threshold is found by the same bisection, with each pass's count summed over the ranks (one scalar
    all-reduce), the ties are shared out from one all-gather of the per-rank tie counts, and the chosen indices are
    all-gathered, so every rank returns the same whole-parameter indices as one process would, and no score
    tensor is ever gathered."""
    if k <= 0 or not names:
        return {}
    keys = {n: _order_key(scores[n]) for n in names}

    def total(count) -> int:  # over every rank when sharded
        c = torch.tensor([count], dtype=torch.int64)
        if shards is not None:
            dist.sum_exact(c)
        return int(c.item())
    lo, hi = -(2 ** 31), 2 ** 31 - 1  # invariant: count(key >= lo) >= k, count(key >= hi + 1) < k
    while lo < hi:  # largest threshold t with at least k keys >= t; at most 32 passes
        mid = (lo + hi + 1) // 2
        if total(sum(int((key >= mid).sum()) for key in keys.values())) >= k:
            lo = mid
        else:
            hi = mid - 1
    t = lo
    take_ties = k - total(sum(int((key > t).sum()) for key in keys.values()))
    if shards is not None:  # this rank's share of the ties: name by name, ranks in the order of their shards
        ties = torch.tensor([int((keys[n] == t).sum()) for n in names], dtype=torch.int64)
        every = dist.gather_all(ties)  # [world, names]
        mine, left = [], take_ties
        for j in range(len(names)):
            for r in range(every.shape[0]):
                a = min(left, int(every[r, j]))
                left -= a
                if r == dist.rank():
                    mine.append(a)
    out = {}
    for j, n in enumerate(names):
        key = keys[n]
        chosen = key > t
        quota = mine[j] if shards is not None else take_ties
        if quota > 0:
            ties = torch.nonzero(key == t).view(-1)[:quota]  # flat indices, ascending
            chosen[ties] = True
            if shards is None:
                take_ties -= ties.numel()
        idx = torch.nonzero(chosen).view(-1).to(torch.int64)
        if shards is not None:
            from piece_mm.shard import offset
            idx = idx + offset(shards[n])
        if idx.numel() or shards is not None:
            out[n] = idx.cpu()
    if shards is not None:
        parts = dist.gather_objects(out)
        out = {n: torch.cat([p[n] for p in parts]) for n in names}
        out = {n: idx for n, idx in out.items() if idx.numel()}
    return out


def _whole_tensors(scores: dict[str, torch.Tensor], names: list[str], k: int,
                   shards: dict | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors, in order of their mean score (ties: parameter order), each taken if it still fits in the k
    elements left: at most k elements in all. Sharded (see _top_k): the means are summed over the ranks."""
    if shards is None:
        numel = [scores[n].numel() for n in names]
        means = [float(scores[n].float().mean()) for n in names]
    else:  # each shard's sum, summed over the ranks, over the whole parameter's size
        sums = torch.tensor([float(scores[n].double().sum()) for n in names], dtype=torch.float64)
        dist.sum_exact(sums)
        numel = [shards[n].numel() for n in names]
        means = [float(sums[i]) / max(numel[i], 1) for i in range(len(names))]
    order = sorted(range(len(names)), key=lambda i: (-means[i], i))
    out, left = {}, k
    for i in order:
        n = names[i]
        if 0 < numel[i] <= left:
            out[n] = torch.arange(numel[i], dtype=torch.int64)
            left -= numel[i]
    return out


def component_k(fraction: float, n_elements: int) -> int:
    """floor(fraction × elements), at least 1 where the fraction is > 0."""
    return max(1, math.floor(fraction * n_elements)) if fraction > 0 else 0


def select_masks(scores: dict[str, torch.Tensor], parts: dict[str, list[str]], budget: Budget | dict | float,
                 pool: str = "component", granularity: str = "element",
                 shards: dict | None = None) -> dict[str, torch.Tensor]:
    """{param name: sorted 1-D int64 flat indices}; parameters with nothing chosen are omitted.

    budget: a pm.Budget (its fractions or total, its pool and its granularity are used), or the fractions per
    component as a dict, or for pool="global" a total fraction.

    granularity="tensor" chooses whole parameter tensors (as the TRACE code does): in order of their mean score,
    each one that still fits in the budget's k elements (so at most k are chosen).

    pool="component": top-k inside each component, k = floor(budget[c] × scorable elements of c) (≥ 1 if > 0).
    pool="global": one top-k over all scorable elements, k from the total budget: a float, or budget["total"], or the
    element-weighted sum of the per-component fractions. This is the paper's selection, kept for ablation; scores
    of different components live on different scales, so it tends to favour one component.

    pool="auto": the same total k as "global", split among the components in proportion to each one's share of the
    score mass (score_mass, auto_split), then a top-k inside each. A component's mass is how much the task's loss
    rests on it as a whole (PIECE-F: its summed squared gradients); the global pool instead follows the largest
    single scores, wherever they are.

    shards: {name: parameter} when the scores are this rank's FSDP2 shards (piece_mm/shard.py); every rank then
    returns the same whole-parameter masks, equal to those one process would choose from the whole scores."""
    if isinstance(budget, Budget):
        budget, pool, granularity = budget.selection(), budget.pool, budget.granularity
    for c, names in parts.items():
        missing = [n for n in names if n not in scores]
        if missing:
            raise KeyError(f"select_masks: no score for {missing[0]!r} ({c})")
    sizes = {c: sum((shards or scores)[n].numel() for n in names) for c, names in parts.items()}
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity: {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    pick = _top_k if granularity == "element" else _whole_tensors

    def top(scores, names, k):
        return pick(scores, names, k, shards)
    if pool == "component":
        if not isinstance(budget, dict):
            raise InputError(f"budget: {budget!r}; pool 'component' needs a fraction per component")
        masks = {}
        for c, names in parts.items():
            frac = float(budget.get(c, 0.0))
            _check_fraction(f"budget.{c}", frac)
            masks.update(top(scores, names, component_k(frac, sizes[c])))
        return masks
    if pool in ("global", "auto"):
        if isinstance(budget, dict):
            if "total" in budget:
                frac = float(budget["total"])
            else:
                n = sum(sizes.values())
                frac = sum(float(budget.get(c, 0.0)) * sizes[c] for c in parts) / max(n, 1)
        else:
            frac = float(budget)
        _check_fraction("budget.total", frac)
        k = component_k(frac, sum(sizes.values()))
        if pool == "global":
            return top(scores, [n for c in COMPONENTS for n in parts.get(c, [])], k)
        ks = auto_split(k, score_mass(scores, parts, shards), sizes)
        masks = {}
        for c, names in parts.items():
            masks.update(top(scores, names, ks[c]))
        return masks
    raise InputError(f"pool: {pool!r}; expected 'component', 'global' or 'auto'")


def score_mass(scores: dict[str, torch.Tensor], parts: dict[str, list[str]], shards: dict | None = None) -> dict:
    """{component: the sum of its scores (negative ones count as 0), in float64}; on FSDP2 shards, summed over the
    ranks, so every rank has the whole model's masses."""
    mass = torch.tensor([sum(float(scores[n].clamp(min=0).sum(dtype=torch.float64)) for n in parts[c])
                         for c in parts], dtype=torch.float64)  # a float64 sum, without a float64 copy
    if shards is not None:
        dist.sum_exact(mass)
    return dict(zip(parts, mass.tolist()))


def auto_split(k: int, mass: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """{component: k_c}: k shared out in proportion to `mass` by largest remainders (ties: the earlier component),
    so the k_c sum to k exactly. No k_c exceeds its component's size: a full component takes all its elements and
    the rest is shared again among the others. When no component left has any mass, the rest goes in proportion to
    size."""
    out = {c: 0 for c in sizes}
    left = [c for c in sizes if sizes[c] > 0]
    k = min(int(k), sum(sizes[c] for c in left))
    while k > 0:
        weight = {c: max(float(mass.get(c, 0.0)), 0.0) for c in left}
        if sum(weight.values()) <= 0:
            weight = {c: float(sizes[c]) for c in left}
        whole = sum(weight.values())
        ideal = {c: k * weight[c] / whole for c in left}
        share = {c: math.floor(ideal[c]) for c in left}
        by_remainder = sorted(left, key=lambda c: (-(ideal[c] - share[c]), left.index(c)))
        for c in by_remainder[:k - sum(share.values())]:
            share[c] += 1
        full = [c for c in left if share[c] >= sizes[c]]
        if not full:
            out.update(share)
            break
        for c in full:
            out[c], k = sizes[c], k - sizes[c]
            left.remove(c)
    return out


def _check_fraction(field: str, frac: float) -> None:
    if not (0.0 <= frac <= 1.0) or math.isnan(frac):
        raise InputError(f"{field}: {frac!r}; expected a fraction in [0, 1]")


def mask_summary(masks: dict[str, torch.Tensor], parts: dict[str, list[str]]) -> dict:
    """{component: {"chosen": n, "layers": {layer index or "other": n}}} plus "total"."""
    where = {n: c for c, names in parts.items() for n in names}
    out = {c: {"chosen": 0, "layers": Counter()} for c in parts}
    for n, idx in masks.items():
        c = where.get(n)
        if c is None:
            raise KeyError(f"mask_summary: {n!r} is in no component")
        out[c]["chosen"] += idx.numel()
        out[c]["layers"][layer_of(n)] += idx.numel()
    for c in out:
        out[c]["layers"] = dict(sorted(out[c]["layers"].items(), key=lambda kv: (kv[0] == "other", kv[0].zfill(6))))
    out["total"] = sum(out[c]["chosen"] for c in parts)
    return out


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| over (param, flat index) pairs; 1.0 for two empty masks."""
    inter = union = 0
    for n in set(a) | set(b):
        x = a.get(n, torch.empty(0, dtype=torch.int64))
        y = b.get(n, torch.empty(0, dtype=torch.int64))
        i = torch.isin(x, y).sum().item()
        inter += i
        union += x.numel() + y.numel() - i
    return inter / union if union else 1.0


def load_budget(name) -> dict:
    """A budget YAML (a path, or a stem in configs/budgets), validated (piece_mm/budget.py), in its plain form."""
    return Budget.from_yaml(name).to_dict()


def budget_arg(b: dict):
    """The `budget` argument of select_masks for a loaded budget."""
    if b["pool"] in ("global", "auto") and b["total"] is not None:
        return {"total": b["total"]}
    return b["fractions"]
