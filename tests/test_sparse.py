import copy

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from piece_mm.tasks import world


def _setup(model, processor, frac=0.01):
    ex = world.task_set("color", "train", 8, seed=1)
    batches = [collate(processor, ex[i:i + 4]) for i in range(0, 8, 4)]
    parts = pm.split_components(model)
    scores = pm.estimate_importance(model, batches, "piece-f", names=[n for c in parts.values() for n in c])
    masks = pm.select_masks(scores, parts, {"vision": 0.001, "projector": 0.01, "llm": frac})
    return batches, masks


def test_50_adamw_steps_with_decay_and_clipping_match_the_compact_reference(tiny):
    _, base, processor = tiny
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    batches, masks = _setup(model, processor)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 60)

    # reference: AdamW on ONE compact vector of the selected elements, gradients gathered by hand, clipped by its norm
    ref_params = dict(ref.named_parameters())
    order = list(masks)
    vec = torch.cat([ref_params[n].detach().reshape(-1)[masks[n]] for n in order]).requires_grad_(True)
    ref_opt = torch.optim.AdamW([vec], lr=1e-3, weight_decay=0.1)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 - s / 60)

    model.train()
    ref.train()
    for step in range(50):
        b = batches[step % 2]
        model(**b).loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

        grads = torch.autograd.grad(ref(**b).loss, [ref_params[n] for n in order])
        vec.grad = torch.cat([g.reshape(-1)[masks[n]] for g, n in zip(grads, order)])
        torch.nn.utils.clip_grad_norm_([vec], 1.0)
        ref_opt.step()
        ref_sched.step()
        with torch.no_grad():
            for n, chunk in zip(order, vec.split([masks[n].numel() for n in order])):
                ref_params[n].view(-1)[masks[n]] = chunk

    moved = 0
    for n, p in model.named_parameters():
        sel = torch.zeros(p.numel(), dtype=torch.bool)
        if n in masks:
            sel[masks[n]] = True
        flat, flat0 = p.detach().reshape(-1), w0[n].reshape(-1)
        assert torch.equal(flat[~sel], flat0[~sel]), n  # unselected: bit-identical
        assert torch.equal(flat[sel], ref_params[n].detach().reshape(-1)[sel]), n  # bit-exact
        moved += int((flat[sel] != flat0[sel]).sum())
    assert moved > 0.9 * sum(i.numel() for i in masks.values())
    # state only for the selected elements; unselected parameters hold no gradient at all
    k = {n: i.numel() for n, i in masks.items()}
    assert sorted(st["exp_avg"].numel() for st in opt.state.values()) == sorted(k.values())
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in masks)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 50 / 60))


def test_optimizer_state_dict_round_trip(tiny):
    _, base, processor = tiny
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    batches, masks = _setup(a, processor)
    oa = pm.sparse_optimizer(a, masks, torch.optim.Adam, lr=1e-3)
    a.train()
    a(**batches[0]).loss.backward()
    oa.step()
    oa.zero_grad()
    b.load_state_dict(a.state_dict())
    ob = pm.sparse_optimizer(b, masks, torch.optim.Adam, lr=1e-3)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from disk: a live state dict shares its tensors
    b.train()
    for m, o in ((a, oa), (b, ob)):
        m(**batches[1]).loss.backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_deltas_replay_the_tuned_model_exactly(tiny, tmp_path):
    alias, base, processor = tiny
    model = copy.deepcopy(base)
    model.train()
    for t in range(2):
        batches, masks = _setup(model, processor, frac=0.005 * (t + 1))
        opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
        for b in batches * 3:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        pm.save_delta(model, masks, tmp_path / f"{t + 1}.safetensors")
    replay = copy.deepcopy(base)
    for t in range(2):
        pm.apply_delta(replay, pm.load_delta(tmp_path / f"{t + 1}.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), replay.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_corrupt_delta_is_a_one_line_input_error(tmp_path):
    from piece_mm.errors import InputError
    bad = tmp_path / "d.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="d.safetensors"):
        pm.load_delta(bad)
    with pytest.raises(InputError, match="not found"):
        pm.load_delta(tmp_path / "missing.safetensors")


def test_micro_batch_accumulation_is_bit_exact_and_keeps_no_dense_gradient(tiny):
    """Two micro-batches per step. Dense gradients are dropped as soon as they are gathered (at most one alive at a
    time during backward), and the result still equals AdamW on the one compact vector, bit for bit."""
    _, base, processor = tiny
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    batches, masks = _setup(model, processor)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    params = list(model.parameters())
    alive = []
    for p in params:
        if p.requires_grad:  # runs after the optimizer's own hook on the same parameter
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))

    ref_params = dict(ref.named_parameters())
    order = list(masks)
    vec = torch.cat([ref_params[n].detach().reshape(-1)[masks[n]] for n in order]).requires_grad_(True)
    ref_opt = torch.optim.AdamW([vec], lr=1e-3, weight_decay=0.1)
    model.train()
    ref.train()
    for step in range(4):
        for b in batches:  # micro-batches: gradients accumulate over both before the step
            (model(**b).loss / 2).backward()
            (ref(**b).loss / 2).backward()
        assert all(p.grad is None for p in params)
        opt.step()
        opt.zero_grad()
        vec.grad = torch.cat([ref_params[n].grad.reshape(-1)[masks[n]] for n in order])
        ref_opt.step()
        ref.zero_grad()
        with torch.no_grad():
            for n, chunk in zip(order, vec.split([masks[n].numel() for n in order])):
                ref_params[n].view(-1)[masks[n]] = chunk
    assert alive and max(alive) == 0
    for n, p in model.named_parameters():
        sel = torch.zeros(p.numel(), dtype=torch.bool)
        if n in masks:
            sel[masks[n]] = True
        flat = p.detach().reshape(-1)
        assert torch.equal(flat[~sel], w0[n].reshape(-1)[~sel]), n
        assert torch.equal(flat[sel], ref_params[n].detach().reshape(-1)[sel]), n

    opt.close()  # hooks gone: backward leaves the dense gradient where autograd put it again
    model(**batches[0]).loss.backward()
    assert any(p.grad is not None for p in params)


def test_scoring_next_to_a_live_sparse_optimizer_sees_the_full_gradients(tiny):
    """The optimizer's gather hooks drop dense gradients; importance scoring pauses them, so its scores are the same
    with an optimizer alive on the model as without one."""
    _, base, processor = tiny
    model = copy.deepcopy(base)
    batches, masks = _setup(model, processor)
    names = list(masks)
    before = pm.estimate_importance(model, batches, "piece-f", names=names)
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3)
    for per_sample in (False, True):
        during = pm.estimate_importance(model, batches, "piece-f", names=names, per_sample=per_sample)
        assert all(during[n].sum() > 0 for n in names)
    during = pm.estimate_importance(model, batches, "piece-f", names=names)
    assert all(torch.equal(before[n], during[n]) for n in names)
    model(**batches[0]).loss.backward()  # and the hooks work again afterwards
    assert all(p.grad is None for p in model.parameters()) and opt.compact_params()[0].grad is not None


def test_bf16_weights_get_fp32_adamw_on_the_compact_vector_rounded_and_frozen_stay_bit_identical():
    """A bf16 model: the selected values are those of fp32 AdamW run on the compact vector (its master copy), rounded
    to bf16 after every step; at lr 1e-5 updates far below bf16's resolution still add up. Every other element is
    bit-identical. The reference loop is written here: weights set to the rounded master, gradient of the same loss,
    fp32 AdamW on the fp32 vector."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {"0.weight": torch.tensor([0, 5, 17, 100, 511]), "2.bias": torch.tensor([1, 3])}
    x = torch.randn(8, 16).to(torch.bfloat16)
    y = torch.randn(8, 4).to(torch.bfloat16)
    kw = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, **kw)
    ref_params = dict(ref_model.named_parameters())
    master = {n: ref_params[n].detach().reshape(-1)[i].float().clone().requires_grad_(True) for n, i in masks.items()}
    ref_opt = torch.optim.AdamW(list(master.values()), **kw)
    for _ in range(30):
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, i in masks.items():
                ref_params[n].view(-1)[i] = master[n].to(torch.bfloat16)
        ref_model.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x).float(), y.float()).backward()
        for n, i in masks.items():
            master[n].grad = ref_params[n].grad.reshape(-1)[i].float()
        ref_opt.step()
    for n, p in model.named_parameters():
        flat, old = p.detach().reshape(-1), base[n].reshape(-1)
        keep = torch.ones_like(flat, dtype=torch.bool)
        if n in masks:
            keep[masks[n]] = False
            assert torch.equal(flat[masks[n]], master[n].detach().to(torch.bfloat16)), n
        assert p.dtype == torch.bfloat16 and torch.equal(flat[keep], old[keep]), n  # frozen: bit-identical
    moved = master["0.weight"].detach() - base["0.weight"].reshape(-1)[masks["0.weight"]].float()
    assert moved.abs().max() > 0  # 30 steps of ~1e-5 moved the master copies
    sd = opt.state_dict()  # the masters travel with the optimizer's state (for --resume)
    assert [m.dtype for m in sd["masters"]] == [torch.float32, torch.float32]
