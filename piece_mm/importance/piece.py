"""The one-pass gradient estimators (PIECE-F, PIECE-S, gradient magnitude) and the two without gradients (magnitude,
random). Each gradient is folded into fp32 sums as backward makes it (_grad_sums)."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from piece_mm import dist, shard
from piece_mm.batching import global_answer_tokens
from piece_mm.importance.registry import register
from piece_mm.persample import PerSample

ACCUMULATE = ("auto", "device", "host")
DEVICE_SHARE = 0.6  # "auto" keeps the accumulators on the GPU when they take at most this share of its free memory


def accumulator_bytes(params: dict, want_sum: bool) -> int:
    """Bytes of the fp32 score accumulators: Σ g² for every scored element, and Σ g too when asked for."""
    return sum(p.numel() for p in params.values()) * 4 * (2 if want_sum else 1)


def accumulator_place(params: dict, want_sum: bool, accumulate: str = "auto") -> str:
    """Where the fp32 accumulators live: "device" (beside the weights) or "host" (pinned CPU memory when the weights
    are on a GPU). "auto": on the device unless it is a GPU whose free memory they would take more than DEVICE_SHARE
    of (the rest is for the activations of the scoring passes)."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate: {accumulate!r}; expected one of {', '.join(ACCUMULATE)}")
    if accumulate != "auto":
        return accumulate  # "host" beside CPU weights is the same memory, but the same code path
    device = next(iter(params.values())).device
    if device.type != "cuda":
        return "device"  # CPU memory is the host memory: there is nowhere else to put them
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if accumulator_bytes(params, want_sum) <= DEVICE_SHARE * free else "host"


def _grad_sums(model, batches: Iterable[dict], params: dict, want_sum: bool, per_sample: bool = False,
               accumulate: str = "auto", log=None):
    """One pass: (Σ_b g_b, Σ_b g_b²) per parameter (float32), g_b = ∂ loss_b / ∂θ, gradients zeroed between batches,
    no optimizer step. Σ g_b is None unless asked for.

    Memory: each weight's gradient is folded into the accumulators the moment backward has finished it (a
    post-accumulate-grad hook) and dropped at once, so the model's gradients never exist all together: scoring needs
    the weights, the fp32 accumulators and the activations. `accumulate` says where the accumulators go
    (accumulator_place); "host" keeps them in pinned CPU memory and adds each gradient there. The sums are the same
    additions in the same order as with dense gradients, so the scores, and the masks, are the same.

    per_sample: each sample of a batch is its own b (its loss the mean over its answer tokens), computed exactly from
    one batched pass (piece_mm/persample.py) instead of a batch-1 loop; its sums stay on the weights' device.

    On FSDP2 shards (piece_mm/shard.py) each batch is this rank's share of a global scoring batch: its loss is
    divided by the global batch's answer-token count, FSDP2 sums the shares' gradients, and each rank adds the whole
    batch's gradient, on its own shard, into sums the size of that shard."""
    device = next(iter(params.values())).device
    sharded = any(shard.is_sharded(p) for p in params.values())
    if sharded and per_sample:
        raise ValueError("estimate_importance: per-sample scoring (score_batch_size 1) needs whole parameters; "
                         "on FSDP2 shards score batches of 2 or more")
    # per-sample scoring adds into the sums from inside its own hooks, on the weights' device
    place = "device" if per_sample else accumulator_place(params, want_sum, accumulate)
    home = torch.device("cpu") if place == "host" else device
    pin = place == "host" and device.type == "cuda"

    def zeros(p):
        return torch.zeros(shard.local(p).shape, dtype=torch.float32, device=home, pin_memory=pin)
    sq = {n: zeros(p) for n, p in params.items()}
    s = {n: zeros(p) for n, p in params.items()} if want_sum else None
    if log is not None:
        n = accumulator_bytes(params, want_sum)
        size = f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
        where = "in pinned host memory" if pin else "in host memory" if place == "host" else f"on {device}"
        log(f"scoring: {'two fp32 sums' if want_sum else 'one fp32 sum'} per weight for "
            f"{sum(p.numel() for p in params.values()):,} weights ({size}, {where}"
            + (f", 1/{dist.world()} of it on each rank" if sharded else "") + "); each gradient is added as "
            "backward makes it, then dropped")
    n_batches = 0
    if per_sample:
        scorer = PerSample(model, params)
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            n_batches += scorer.add(batch, sq, s)  # PerSample keeps only one module's per-sample gradients at a time
    else:
        def fold(name):
            def hook(p):
                g = shard.local(p.grad).detach().to(home, torch.float32)
                p.grad = None  # this weight's gradient is in the sums: free it before the next one arrives
                sq[name].addcmul_(g, g)
                if s is not None:
                    s[name].add_(g)
            return hook
        handles = [p.register_post_accumulate_grad_hook(fold(n)) for n, p in params.items()]
        # on shards the ranks' shares of a batch must add up, however the model was sharded (shard.summed)
        try:
            with shard.summed(model) if sharded else contextlib.nullcontext():
                for batch in batches:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for p in params.values():
                        p.grad = None
                    if sharded:  # this rank's share of the batch, over the whole batch's answer tokens
                        count = global_answer_tokens([batch])
                        model(**batch, num_items_in_batch=count.to(device)).loss.backward()
                    else:
                        model(**batch).loss.backward()  # a weight off this batch's path gets no hook call: adds 0
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
    # Under several processes each passes its own share of the batches: the sums are summed across them, so every
    # process ends with the same scores (and chooses the same mask).
    count = torch.tensor([float(n_batches)])
    if not sharded:  # on shards every rank has seen every batch already, through FSDP2's reduce-scatter
        dist.sum_([count] + list(sq.values()) + (list(s.values()) if s is not None else []))
    if count.item() == 0:
        raise ValueError("estimate_importance: `batches` yielded nothing")
    return s, sq


@register("piece-f")
def piece_f(model, batches, params, per_sample: bool = False, accumulate: str = "auto", log=None, **_):
    """PIECE-F: Σ_b g_b² (the empirical Fisher diagonal, unnormalised)."""
    return _grad_sums(model, batches, params, False, per_sample, accumulate, log)[1]


@register("piece-s")
def piece_s(model, batches, params, per_sample: bool = False, accumulate: str = "auto", log=None, **_):
    """PIECE-S: |Σ_b g_b| / sqrt(Σ_b g_b² + 1). The +1 is literal, as in the authors' code: it damps weights whose
    gradients are large but disagree in sign across batches."""
    s, sq = _grad_sums(model, batches, params, True, per_sample, accumulate, log)
    for n in params:  # in place, one tensor at a time: no third full-size buffer
        s[n].abs_().div_(sq[n].add_(1.0).sqrt_())
        del sq[n]
    return s


@register("grad-magnitude")
def grad_magnitude(model, batches, params, per_sample: bool = False, accumulate: str = "auto", log=None, **_):
    """|Σ_b g_b|: ablation, the first-order term without PIECE-S's normalisation."""
    s = _grad_sums(model, batches, params, True, per_sample, accumulate, log)[0]
    return {n: t.abs_() for n, t in s.items()}


@register("magnitude")
def magnitude(model, batches, params, **_):
    """|θ|: ablation that ignores the task."""
    return {n: shard.local(p).detach().float().abs() for n, p in params.items()}


@register("random")
def random(model, batches, params, seed: int = 0, **_):
    """Uniform random scores from a seeded generator (CPU, so the mask does not depend on the device)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}
