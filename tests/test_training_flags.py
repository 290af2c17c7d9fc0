"""--grad-accum, --gradient-checkpointing and --max-length: the first two change how a step is computed, not what it
computes; the third leaves out, and counts, the examples that do not fit."""
import copy

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import ROWS, collate, fit_length
from piece_mm.continual import make_scheduler, train_task
from piece_mm.regularise import Distillation, Regulariser
from piece_mm.tasks import world
from piece_mm.tasks.sequence import Task


def _tuned(model, processor, masks, **kw):
    task = Task("size", world.task_set("size", "train", 32, seed=3), [], "exact")
    model = copy.deepcopy(model)
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 8, seed=0, desc="t", **kw)
    opt.close()
    return {n: p.detach().reshape(-1)[masks[n]].clone() for n, p in model.named_parameters() if n in masks}


@pytest.fixture(scope="module")
def llava_and_masks():
    model, processor = pm.load_model("llava")
    parts = pm.split_components(model)
    batches = [collate(processor, world.task_set("size", "train", 16, seed=3))]
    scores = pm.estimate_importance(model, batches, "piece-f", names=[n for c in parts.values() for n in c])
    return model, processor, pm.select_masks(scores, parts, {"vision": 0.0, "projector": 0.0, "llm": 0.01})


def test_gradient_accumulation_takes_the_same_steps(llava_and_masks):
    model, processor, masks = llava_and_masks
    whole = _tuned(model, processor, masks)
    split = _tuned(model, processor, masks, grad_accum=2)
    for n in whole:
        assert torch.allclose(whole[n], split[n], rtol=1e-4, atol=1e-6), n
    assert any(not torch.equal(whole[n], model.get_parameter(n).detach().reshape(-1)[masks[n]]) for n in whole)


def test_gradient_checkpointing_takes_the_same_steps(llava_and_masks):
    model, processor, masks = llava_and_masks
    plain = _tuned(model, processor, masks)
    ckpt = _tuned(model, processor, masks, gradient_checkpointing=True)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-6), n
    on = model.is_activation_checkpointing if hasattr(type(model), "is_activation_checkpointing") else \
        model.is_gradient_checkpointing
    assert not on  # only the copy was trained


def test_max_length_leaves_out_and_counts_what_does_not_fit(llava_and_masks):
    _, processor, _ = llava_and_masks
    exs = world.task_set("size", "train", 12, seed=1) + world.knowledge_set(5, 6)  # text-only ones are shorter
    lengths = [collate(processor, [ex])["input_ids"].shape[1] for ex in exs]
    cut = sorted(lengths)[len(lengths) // 2]
    kept, dropped = fit_length(processor, exs, cut)
    assert kept == [ex for ex, n in zip(exs, lengths) if n <= cut] and dropped == sum(n > cut for n in lengths)
    assert 0 < dropped < len(exs)


def test_bad_training_flags_are_one_line(tmp_path, capsys):
    from piece_mm.train import main
    assert main(["--grad-accum", "0", "--output", str(tmp_path / "a")]) == 2
    assert "--grad-accum" in capsys.readouterr().err
    assert main(["--grad-accum", "32", "--batch-size", "16", "--output", str(tmp_path / "b")]) == 2
    assert "--grad-accum 32" in capsys.readouterr().err
    seq = tmp_path / "s.yaml"
    seq.write_text("tasks:\n  - {name: size, format: world}\nworld: {train_examples: 8, test_examples: 4}\n"
                   "general: {captions: 2, vqa: 2}\n")
    assert main(["--tasks", str(seq), "--max-length", "5", "--max-steps", "1", "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-length 5" in err and "'size'" in err


def test_scoring_under_checkpointing_recomputes_and_gives_the_same_scores(llava_and_masks):
    """Scoring runs in eval mode; with checkpointing on, the layers still recompute their forward in backward (each
    LLM layer runs twice per batch), no dropout is switched on, and the scores are the dense ones."""
    from piece_mm.models import activation_checkpointing

    model, processor, _ = llava_and_masks
    model = copy.deepcopy(model)
    names = [n for n in pm.split_components(model)["llm"]]
    batches = [collate(processor, world.task_set("size", "train", 8, seed=4))]
    plain = pm.estimate_importance(model, batches, "piece-s", names=names)
    layer = model.model.language_model.layers[0]
    calls = []
    act = layer.mlp.act_fn.forward  # runs inside the checkpointed forward (module hooks do not run on recompute)
    layer.mlp.act_fn.forward = lambda x: (calls.append(1), act(x))[1]
    with activation_checkpointing(model, True):
        ckpt = pm.estimate_importance(model, batches, "piece-s", names=names)
        assert not any(m.training for m in model.modules() if not getattr(m, "gradient_checkpointing", False))
    del layer.mlp.act_fn.forward
    assert len(calls) == 2  # forward, then its recomputation in backward
    assert not model.training and not layer.training and model.config.text_config.use_cache is not False
    for n in names:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-8), n


def _distilled(model, processor, masks, tmp_path, **kw):
    """Three steps of PIECE-F's own tuning with the budget's distillation term (its teacher cached at the start)."""
    from piece_mm.methods import METHODS, TaskContext
    mixed = world.task_set("size", "train", 16, seed=3) + world.knowledge_set(16, 6)  # text-only ones are shorter
    task = Task("size", mixed, [], "exact")
    model = copy.deepcopy(model)
    budget = pm.Budget(fractions={"llm": 0.01}, distill={"weight": 1.0, "temperature": 2.0}).to_dict()
    ctx = TaskContext(lr=1e-2, budget=budget, tasks=[task], output=tmp_path)
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=masks)
    opt = tuning.optimizer
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 8, seed=0, desc="t",
               regulariser=tuning.regulariser, **kw)
    tuning.close()
    return {n: p.detach().reshape(-1)[masks[n]].clone() for n, p in model.named_parameters() if n in masks}


class _EqualShares(Regulariser):
    """A regulariser's term averaged within each batch and counted once per batch: an equal share per micro-batch,
    as a term like EWC's takes (what the loop must not do with a per-position term)."""

    def __init__(self, reg):
        self.reg = reg

    def counts(self, batch):
        return torch.ones(len(self.reg.counts(batch)))

    def __call__(self, model, batch, out):
        return self.reg(model, batch, out) / self.reg.counts(batch).clamp_min(1)


def _rows(processor, exs, held, own: range, kept: range = range(0)) -> dict:
    """A batch of exs[own] and held[kept], saying which prepared rows it holds (as the loop's batches do)."""
    batch = collate(processor, [exs[i] for i in own] + [held[j] for j in kept], held=len(kept))
    batch[ROWS] = torch.tensor(list(own) + [len(exs) + j for j in kept], dtype=torch.long)
    return batch


def test_micro_batches_take_the_distillation_term_by_their_share_of_positions(llava_and_masks, tmp_path):
    """One step's gradient on the chosen elements, whole batch against two micro-batches of different lengths: the
    same, because the loop divides the term's sums by the step's count of positions (an equal share per micro-batch,
    as a term like EWC's takes, would not give it)."""
    from piece_mm.continual import _step
    from piece_mm.methods import METHODS, TaskContext
    model, processor, masks = llava_and_masks
    exs = world.task_set("size", "train", 4, seed=3) + world.knowledge_set(4, 6)  # text-only ones are shorter
    budget = pm.Budget(fractions={"llm": 0.01}, distill={"weight": 1.0, "temperature": 2.0}).to_dict()
    grads = {}
    for by_position in (True, False):
        for parts in ([range(8)], [range(4), range(4, 8)]):
            m = copy.deepcopy(model)
            ctx = TaskContext(lr=1e-2, budget=budget, tasks=[Task("size", exs, [], "exact")], output=tmp_path)
            tuning = METHODS["piece-f"].for_task(m, processor, ctx.task, ctx, masks=masks)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():  # the chosen weights away from the teacher's, so that the term has a gradient
                for n, idx in masks.items():
                    w = m.get_parameter(n).view(-1)
                    w[idx] += 0.05 * torch.randn(idx.numel(), generator=gen)
            m.train()
            reg = tuning.regulariser if by_position else _EqualShares(tuning.regulariser)
            _step(m, [_rows(processor, exs, [], p) for p in parts], "cpu", reg)
            grads[by_position, len(parts)] = torch.cat([c.grad for c in tuning.optimizer.compact_params()])
            tuning.close()
    whole, split = grads[True, 1], grads[True, 2]
    assert (whole - split).norm() <= 1e-4 * whole.norm()
    assert (grads[False, 1] - grads[False, 2]).norm() > 1e-3 * whole.norm()  # equal shares: another gradient


@pytest.mark.parametrize("flag", [{"gradient_checkpointing": True}])
def test_the_distillation_term_takes_the_same_steps_with_checkpointing(llava_and_masks, tmp_path, flag):
    """The teacher's forward runs in eval mode, outside checkpointing; the student's is recomputed in backward from
    the weights as they are after the teacher's values are gone: the same steps."""
    model, processor, masks = llava_and_masks
    plain = _distilled(model, processor, masks, tmp_path / "a")
    other = _distilled(model, processor, masks, tmp_path / "b", **flag)
    for n in plain:
        assert torch.allclose(plain[n], other[n], rtol=1e-4, atol=1e-6), n
    assert any(not torch.equal(plain[n], model.get_parameter(n).detach().reshape(-1)[masks[n]]) for n in plain)


def test_micro_batches_take_each_part_of_the_held_term_by_its_own_share(llava_and_masks, tmp_path):
    """With held prompts the term has two parts, each a mean over its own positions (the task's rows, the held rows'
    answers). One step's gradient, whole batch against two micro-batches that split both kinds of rows unevenly: the
    same, because each part is divided by its own count over the step; each micro-batch's own mean of each part, in
    equal shares, gives another."""
    from piece_mm.continual import _step
    model, processor, masks = llava_and_masks
    task = world.task_set("size", "train", 5, seed=3)
    held = world.caption_set(3, 3)  # answered with captions: held rows longer than the task's
    grads = {}
    for own in (True, False):
        for split in ([(range(5), range(3))], [(range(4), range(1)), (range(4, 5), range(1, 3))]):
            m = copy.deepcopy(model)
            reg = Distillation(weight=1.0, temperature=2.0, held_weight=3.0).prepare(m, processor, task, held)
            opt = pm.sparse_optimizer(m, masks, torch.optim.AdamW, lr=1e-2)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():  # the chosen weights away from the teacher's, so that the term has a gradient
                for n, idx in masks.items():
                    m.get_parameter(n).view(-1)[idx] += 0.05 * torch.randn(idx.numel(), generator=gen)
            m.train()
            batches = [_rows(processor, task, held, t, h) for t, h in split]
            _step(m, batches, "cpu", reg if own else _EqualShares(reg))
            grads[own, len(split)] = torch.cat([c.grad for c in opt.compact_params()])
            opt.close()
    whole, parts = grads[True, 1], grads[True, 2]
    assert (whole - parts).norm() <= 1e-4 * whole.norm()
    assert (grads[False, 1] - grads[False, 2]).norm() > 1e-3 * whole.norm()  # equal shares: another
