"""TRACE probing: the probe leaves W_0 bit-identical, the scores follow the authors' formula, specificity, tensor
granularity, and small-to-large mask transfer."""
import copy

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from piece_mm.importance.trace import cosine, cosine_matrix, sketch, specificity
from piece_mm.tasks import world


def _batches(processor, n=8, bs=4):
    ex = world.task_set("color", "train", n)
    return [collate(processor, ex[i:i + bs]) for i in range(0, n, bs)]


def _llm_names(model):
    return pm.split_components(model)["llm"]


def test_probe_leaves_the_model_bit_identical(tiny):
    _, model, processor = tiny
    before = {n: t.clone() for n, t in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = {}
    scores = pm.estimate_importance(model, _batches(processor), "trace", names=_llm_names(model), probe_steps=3,
                                    probe_lr=1e-3, probe_out=out)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert set(scores) == set(_llm_names(model)) and set(out["sketch"]) == set(scores)
    assert max(float(s.max()) for s in scores.values()) > 0


def test_tensor_scores_follow_the_formula(tiny):
    """Reference computation here: the same probe by hand on a copy, RMS of ΔW and mean g² on the probed copy,
    min-max over tensors, 0.5 / 0.5."""
    _, model, processor = tiny
    names = _llm_names(model)
    batches = _batches(processor)
    got = pm.estimate_importance(model, batches, "trace", names=names, probe_steps=3, probe_lr=1e-3, level="tensor",
                                 specificity_rule="none")
    ref = copy.deepcopy(model).eval()
    params = dict(ref.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    w0 = {n: params[n].detach().clone() for n in names}
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(3):
        ref(**batches[step % 2]).loss.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], 1.0)
        opt.step()
        opt.zero_grad()
    rms = torch.tensor([float((params[n].detach() - w0[n]).pow(2).mean().sqrt()) for n in names])
    fisher = torch.zeros(len(names))
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        fisher += torch.tensor([float(params[n].grad.pow(2).mean()) if params[n].grad is not None else 0.0
                                for n in names]) / len(batches)

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())
    want = 0.5 * mm(rms) + 0.5 * mm(fisher)
    for i, n in enumerate(names):
        assert torch.allclose(got[n], torch.full_like(got[n], float(want[i])), atol=1e-4), n


def test_sketch_cosine_estimates_the_true_cosine():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 96, generator=g)
    for target in (0.9, 0.5, 0.0, -0.7):
        noise = torch.randn(64, 96, generator=g)
        noise -= (noise * a).sum() / (a * a).sum() * a  # orthogonal to a
        b = target * a / a.norm() + (1 - target ** 2) ** 0.5 * noise / noise.norm()
        assert cosine(sketch(a, "w"), sketch(b, "w")) == pytest.approx(float((a * b).sum() / a.norm() / b.norm()),
                                                                      abs=0.1)


def test_specificity_rules(tiny):
    """With an earlier task whose update was this very update, "weight" zeroes every score and "filter" pushes every
    tensor below the rest; with no history the core score is unchanged."""
    _, model, processor = tiny
    names = _llm_names(model)[:6]
    batches = _batches(processor)
    kw = dict(names=names, probe_steps=2, probe_lr=1e-3)
    out = {}
    core = pm.estimate_importance(model, batches, "trace", probe_out=out, specificity_rule="none", **kw)
    same = pm.estimate_importance(model, batches, "trace", history=[out["sketch"]], **kw)
    assert all(float(s.abs().max()) < 1e-6 for s in same.values())  # cos = 1 up to rounding
    filt = pm.estimate_importance(model, batches, "trace", history=[out["sketch"]], specificity_rule="filter", **kw)
    assert all(bool((s == -1).all()) for s in filt.values())
    fresh = pm.estimate_importance(model, batches, "trace", history=[], **kw)
    assert all(torch.equal(core[n], fresh[n]) for n in names)
    spec = specificity(out["sketch"], [out["sketch"], {n: -t for n, t in out["sketch"].items()}])
    assert all(abs(v) < 1e-6 for v in spec.values())  # +1 and -1 average out
    C = cosine_matrix([out["sketch"], {n: -t for n, t in out["sketch"].items()}])
    assert C[0][0] == pytest.approx(1.0) and C[0][1] == pytest.approx(-1.0)


def test_tensor_granularity_takes_whole_tensors_in_score_order():
    g = torch.Generator().manual_seed(1)
    sizes = [(40,), (10, 10), (30,), (5, 4), (50,), (7,)]
    names = [f"language_model.w{i}" for i in range(len(sizes))]
    scores = {n: torch.rand(s, generator=g) + i % 3 for i, (n, s) in enumerate(zip(names, sizes))}
    parts = {"vision": [], "projector": [], "llm": names}
    n_total = sum(t.numel() for t in scores.values())
    masks = pm.select_masks(scores, parts, {"llm": 0.5}, granularity="tensor")
    k = int(0.5 * n_total)
    # reference: greedy by mean score, each tensor if it fits
    left, want = k, set()
    for n in sorted(names, key=lambda n: (-float(scores[n].mean()), names.index(n))):
        if scores[n].numel() <= left:
            want.add(n)
            left -= scores[n].numel()
    assert set(masks) == want and sum(m.numel() for m in masks.values()) <= k
    assert all(torch.equal(masks[n], torch.arange(scores[n].numel())) for n in masks)


def _llava_from_config(layers):
    import yaml
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from piece_mm.zoo import CONFIG_DIR
    cfg = yaml.safe_load((CONFIG_DIR / "llava.yaml").read_text())
    v = CLIPVisionConfig(image_size=64, **{**cfg["vision"], "num_hidden_layers": layers})
    t = LlamaConfig(vocab_size=300, **{**cfg["text"], "num_hidden_layers": layers})
    torch.manual_seed(layers)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_id=299,
                                                     vision_feature_layer=-1))


def test_transfer_masks_3_to_6_layers():
    small, large = _llava_from_config(3), _llava_from_config(6)
    budget = {"vision": 0.01, "projector": 0.02, "llm": 0.001}
    scores = {n: torch.rand(p.shape) for n, p in small.named_parameters()}
    masks = pm.select_masks(scores, pm.split_components(small), budget)
    out = pm.transfer_masks(masks, small, large)
    params = dict(large.named_parameters())
    for n, idx in out.items():
        assert idx.dtype == torch.int64 and idx.dim() == 1 and bool((idx[1:] > idx[:-1]).all())
        assert 0 <= int(idx.min()) and int(idx.max()) < params[n].numel()
    for c, names in pm.split_components(large).items():
        n = sum(params[x].numel() for x in names)
        got = sum(out[x].numel() for x in names if x in out)
        assert abs(got - budget[c] * n) <= 0.01 * budget[c] * n, c
    # layer 4 of 6 maps to layer 2 of 3: what the small model chose there is what the large one prefers there
    src = "model.language_model.layers.2.mlp.down_proj.weight"
    dst = "model.language_model.layers.4.mlp.down_proj.weight"
    if src in masks:
        assert torch.isin(out.get(dst, torch.empty(0, dtype=torch.int64)), masks[src]).float().mean() > 0.5


def test_transfer_masks_refuses_another_family(tiny):
    alias, model, _ = tiny
    other = _llava_from_config(3)
    if alias == "llava":
        pytest.skip("same family")
    masks = pm.select_masks({n: torch.rand(p.shape) for n, p in other.named_parameters()},
                            pm.split_components(other), {"llm": 0.01})
    with pytest.raises(ValueError, match="does not have"):
        pm.transfer_masks(masks, other, model)
