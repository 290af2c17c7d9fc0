import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from tasks import world


def _batches(processor, n=6, bs=2):
    ex = world.task_set("color", "train", n, seed=3)
    return [collate(processor, ex[i:i + bs]) for i in range(0, n, bs)]


def _reference(model, batches, names):
    """Σ g_b and Σ g_b² from torch.autograd.grad, batch by batch, on a copy of the weights' gradient path."""
    params = [dict(model.named_parameters())[n] for n in names]
    s = [torch.zeros_like(p) for p in params]
    sq = [torch.zeros_like(p) for p in params]
    for b in batches:
        gs = torch.autograd.grad(model(**b).loss, params, allow_unused=True)
        for i, g in enumerate(gs):
            if g is not None:
                s[i] += g
                sq[i] += g * g
    return dict(zip(names, s)), dict(zip(names, sq))


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_piece_scores_match_the_formulas_and_change_nothing(tiny):
    alias, model, processor = tiny
    parts = pm.split_components(model)
    names = [n for c in parts.values() for n in c]
    batches = _batches(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    f = pm.estimate_importance(model, batches, "piece-f", names=names)
    s = pm.estimate_importance(model, batches, "piece-s", names=names)
    gm = pm.estimate_importance(model, batches, "grad-magnitude", names=names)
    assert model.training  # mode restored
    model.eval()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit-identical
    assert all(p.requires_grad == flags[n] and p.grad is None for n, p in model.named_parameters())
    ref_s, ref_sq = _reference(model, batches, names)
    for n in names:
        assert f[n].shape == before[n].shape and f[n].dtype == torch.float32
        assert _rel_err(f[n], ref_sq[n]) < 1e-4, n
        expect = ref_s[n].abs() / torch.sqrt(ref_sq[n] + 1)  # the literal +1 of the reference code
        assert _rel_err(s[n], expect) < 1e-4, n
        assert _rel_err(gm[n], ref_s[n].abs()) < 1e-4, n
    assert sum(f[n].sum().item() for n in names) > 0


def test_magnitude_random_and_registry(tiny):
    _, model, processor = tiny
    names = [n for n, _ in model.named_parameters()][:5]
    m = pm.estimate_importance(model, [], "magnitude", names=names)
    assert all(torch.equal(m[n], dict(model.named_parameters())[n].detach().abs()) for n in names)
    r1 = pm.estimate_importance(model, [], "random", names=names, seed=7)
    r2 = pm.estimate_importance(model, [], "random", names=names, seed=7)
    r3 = pm.estimate_importance(model, [], "random", names=names, seed=8)
    assert all(torch.equal(r1[n], r2[n]) for n in names) and not torch.equal(r1[names[0]], r3[names[0]])
    with pytest.raises(KeyError, match="no-such"):
        pm.estimate_importance(model, [], "no-such")
    from piece_mm.importance import ESTIMATORS
    assert {"piece-f", "piece-s", "grad-magnitude", "magnitude", "random"} <= set(ESTIMATORS)


def test_scoring_batch_size_one_is_per_sample(tiny):
    """Batch 1 gives Σ_n g_n² (per-sample), which differs from the squared gradient of the summed batch."""
    _, model, processor = tiny
    ex = world.task_set("size", "train", 4, seed=5)
    names = ["lm_head.weight"]
    per_sample = pm.estimate_importance(model, [collate(processor, [e]) for e in ex], "piece-f", names=names)
    ref = sum(_reference(model, [collate(processor, [e])], names)[1][names[0]] for e in ex)
    assert _rel_err(per_sample[names[0]], ref) < 1e-4
    whole = pm.estimate_importance(model, [collate(processor, ex)], "piece-f", names=names)
    assert not torch.allclose(whole[names[0]], per_sample[names[0]])
