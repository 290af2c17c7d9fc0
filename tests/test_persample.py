import copy
import warnings

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from piece_mm.tasks import world


def _loop_reference(model, examples, processor, names):
    """Σ_n g_n and Σ_n g_n² from torch.autograd.grad on one sample at a time (the reference code's batch-1 loop)."""
    params = dict(model.named_parameters())
    s = {n: torch.zeros_like(params[n]) for n in names}
    sq = {n: torch.zeros_like(params[n]) for n in names}
    for ex in examples:
        grads = torch.autograd.grad(model(**collate(processor, [ex])).loss, [params[n] for n in names],
                                    allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                s[n] += g
                sq[n] += g * g
    return s, sq


def _max_rel_err(got, ref, floor=1e-10):
    """Max over parameters of max|got - ref| / max|ref|, over parameters whose reference is above rounding noise
    (an attention key bias has a zero gradient in exact arithmetic: both sides hold noise there, ~1e-7 of the top
    gradient, so ~1e-14 of the top squared one)."""
    top = max(r.abs().max().item() for r in ref.values())
    errs = [((got[n] - r).abs().max() / r.abs().max()).item() for n, r in ref.items() if r.abs().max() > floor * top]
    return max(errs), len(errs)


def test_batched_per_sample_scores_equal_the_batch_1_loop(tiny):
    _, model, processor = tiny
    ex = world.task_set("color", "train", 10, seed=3)
    names = [n for n, _ in model.named_parameters()]  # every kind of parameter, token embeddings included
    batches = [collate(processor, ex[:6]), collate(processor, ex[6:])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter of both families is covered: no fallback warning
        f = pm.estimate_importance(model, batches, "piece-f", names=names, per_sample=True)
        s = pm.estimate_importance(model, batches, "piece-s", names=names, per_sample=True)
    ref_s, ref_sq = _loop_reference(model, ex, processor, names)
    err, checked = _max_rel_err(f, ref_sq)
    assert err < 1e-4 and checked > 0.9 * len(names)
    expect = {n: ref_s[n].abs() / torch.sqrt(ref_sq[n] + 1) for n in names}
    assert _max_rel_err(s, expect, floor=1e-5)[0] < 1e-4
    # and it is not the squared gradient of each whole batch
    whole = pm.estimate_importance(model, batches, "piece-f", names=names[-1:])
    assert _max_rel_err(whole, {names[-1]: ref_sq[names[-1]]})[0] > 1e-2


class _ScaledGELU(torch.nn.Module):
    """A module kind the batched rules do not know: its parameter must fall back to the loop, visibly."""

    def __init__(self, dim):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return torch.nn.functional.gelu(x) * self.alpha


def test_an_unknown_module_falls_back_to_the_loop_and_says_so():
    base, processor = pm.load_model("llava")
    model = copy.deepcopy(base)
    proj = model.model.multi_modal_projector
    proj.act = _ScaledGELU(proj.linear_1.out_features)
    names = ["model.multi_modal_projector.act.alpha", "model.multi_modal_projector.linear_1.weight",
             "lm_head.weight"]
    ex = world.task_set("size", "train", 5, seed=2)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\).*act\.alpha.*batch-1 loop"):
        f = pm.estimate_importance(model, [collate(processor, ex)], "piece-f", names=names, per_sample=True)
    ref = _loop_reference(model, ex, processor, names)[1]
    assert _max_rel_err(f, ref)[0] < 1e-4


def test_a_reused_module_is_not_guessed_at():
    """A module called twice per forward: its per-sample gradient is the sum over both calls before squaring, which
    the per-call rules cannot give. The guard sends it to the loop, and the result is still exact."""
    base, processor = pm.load_model("llava")
    model = copy.deepcopy(base)
    proj = model.model.multi_modal_projector
    inner = proj.linear_2
    twice = torch.nn.Linear(inner.out_features, inner.out_features)
    with torch.no_grad():
        twice.weight.copy_(torch.eye(inner.out_features) * 0.5)
        twice.bias.zero_()

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.lin = inner, twice

        def forward(self, x):
            return self.lin(self.lin(self.inner(x))) * 4.0

    proj.linear_2 = Twice()
    names = ["model.multi_modal_projector.linear_2.lin.weight", "model.multi_modal_projector.linear_2.inner.weight"]
    ex = world.task_set("size", "train", 4, seed=2)
    with pytest.warns(UserWarning, match="lin.weight"):
        f = pm.estimate_importance(model, [collate(processor, ex)], "piece-f", names=names, per_sample=True)
    assert _max_rel_err(f, _loop_reference(model, ex, processor, names)[1])[0] < 1e-4


def test_a_text_only_sample_sends_the_batch_to_the_loop_with_the_right_split():
    """Images not one per sample (here: the second sample is text only): rows cannot be assigned, so the whole batch
    is scored per sample by the loop, each sample with its own images; the result still equals the reference."""
    model, processor = pm.load_model("llava")
    ex = world.task_set("size", "train", 2, seed=4)
    batch = collate(processor, ex)
    tok = model.config.image_token_id
    ids = batch["input_ids"][1]
    keep = ids != tok
    text_only = {k: v[1:2] for k, v in batch.items() if k != "pixel_values"}
    n = int(keep.sum())
    for k in ("input_ids", "attention_mask", "labels"):  # drop sample 2's image tokens, pad at the right
        row = torch.full_like(batch[k][1], {"input_ids": 0, "attention_mask": 0, "labels": -100}[k])
        row[:n] = batch[k][1][keep]
        batch[k][1] = row
        text_only[k] = row[None]
    batch["pixel_values"] = batch["pixel_values"][:1]
    first = {k: v[:1] for k, v in batch.items()}
    names = ["lm_head.weight", "model.multi_modal_projector.linear_1.weight"]
    with pytest.warns(UserWarning, match="batch-1 loop"):
        f = pm.estimate_importance(model, [batch], "piece-f", names=names, per_sample=True)
    params = dict(model.named_parameters())
    ref = {nm: torch.zeros_like(params[nm]) for nm in names}
    for one in (first, text_only):
        for nm, g in zip(names, torch.autograd.grad(model(**one).loss, [params[nm] for nm in names],
                                                    allow_unused=True)):
            if g is not None:
                ref[nm] += g * g
    assert _max_rel_err(f, ref)[0] < 1e-4
