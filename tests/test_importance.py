import math

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from piece_mm.tasks import world


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


def _dense_sums(model, batches, names):
    """The dense computation the lean scoring replaces: a whole backward, then every gradient added in fp32."""
    params = dict(model.named_parameters())
    s = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    sq = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n in names:
            g = params[n].grad
            if g is not None:
                sq[n] += g.float() * g.float()
                s[n] += g.float()
    model.zero_grad(set_to_none=True)
    return s, sq


@pytest.mark.parametrize("where", ["device", "host"])
def test_lean_scoring_selects_what_dense_fp32_scoring_selects(tiny, where):
    """Gradients folded in one weight at a time (and sums kept on the host) choose exactly the dense fp32 masks."""
    _, model, processor = tiny
    parts = pm.split_components(model)
    names = [n for c in parts.values() for n in c]
    batches = _batches(processor, n=8, bs=4)
    s, sq = _dense_sums(model, batches, names)
    dense = {"piece-f": sq, "piece-s": {n: s[n].abs() / torch.sqrt(sq[n] + 1) for n in names}}
    budget = {"vision": 0.01, "projector": 0.01, "llm": 0.01}
    lines = []
    for method in ("piece-f", "piece-s"):
        lean = pm.estimate_importance(model, batches, method, names=names, accumulate=where, log=lines.append)
        for pool in ("component", "global", "auto"):
            b = budget if pool == "component" else {"total": 0.01}
            got = pm.select_masks(lean, parts, b, pool=pool)
            want = pm.select_masks(dense[method], parts, b, pool=pool)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[n], want[n]) for n in want), (method, pool)
        # auto: each component's count is the total's share by its summed dense scores, rounded
        k = math.floor(0.01 * sum(dense[method][n].numel() for n in names))
        mass = {c: sum(float(dense[method][n].double().sum()) for n in parts[c]) for c in parts}
        for c in parts:
            n_c = sum(got[n].numel() for n in parts[c] if n in got)
            assert abs(n_c - k * mass[c] / sum(mass.values())) < 1, (method, c)
    assert len(lines) == 2 and "one fp32 sum per weight" in lines[0] and "two fp32 sums" in lines[1]
    assert all(("in host memory" if where == "host" else "on cpu") in x for x in lines), lines


def test_lean_scoring_never_holds_the_whole_models_gradients(tiny):
    """While scoring, at most one weight holds a gradient at any moment (a dense backward keeps all of them until it
    ends), so gradient memory is one weight's, not the model's."""
    _, model, processor = tiny
    names = [n for c in pm.split_components(model).values() for n in c]
    batches = _batches(processor, n=4, bs=2)
    params = dict(model.named_parameters())
    seen = []
    # registered before scoring's own hooks, so each call sees the weight whose gradient has just been finished
    handles = [params[n].register_post_accumulate_grad_hook(
        lambda _: seen.append(sum(params[m].grad is not None for m in names))) for n in names]
    try:
        pm.estimate_importance(model, batches, "piece-f", names=names)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) > len(names) and max(seen) == 1, max(seen)


def test_budget_score_memory_field(tmp_path):
    from piece_mm.errors import InputError
    from piece_mm.select import load_budget
    f = tmp_path / "b.yaml"
    f.write_text("score_memory: disk\n")
    with pytest.raises(InputError, match=r"b.yaml: score_memory is 'disk'; expected auto, device or host"):
        load_budget(f)
    f.write_text("score_memory: host\n")
    assert load_budget(f)["score_memory"] == "host"
