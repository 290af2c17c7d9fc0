import copy

import pytest
import torch

import piece_mm as pm
from piece_mm.batching import collate
from piece_mm.tasks import world


def test_hf_trainer_with_the_sparse_optimizer_and_a_scheduler(tmp_path):
    """transformers.Trainer(optimizers=(opt, sched)) trains only the selected elements; the schedule reaches them."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    base, processor = pm.load_model("llava")
    model = copy.deepcopy(base)
    ex = world.task_set("size", "train", 16, seed=2)
    parts = pm.split_components(model)
    scores = pm.estimate_importance(model, [collate(processor, ex[i:i + 4]) for i in range(0, 16, 4)], "piece-s",
                                    names=[n for c in parts.values() for n in c])
    masks = pm.select_masks(scores, parts, {"projector": 0.01, "llm": 0.005})
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    sched = get_linear_schedule_with_warmup(opt, 1, 6)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=0.0)
    clip = pm.PieceCallback(max_grad_norm=1e-3)  # tiny, so that clipping certainly bites
    seen = []
    inner_step = opt.inner.step  # spy: the compact gradient as the inner optimizer receives it

    def spy():
        seen.append(torch.linalg.vector_norm(torch.cat([c.grad for c in opt.compact_params()])).item())
        return inner_step()
    opt.inner.step = spy
    trainer = Trainer(model=model, args=args, train_dataset=ex, data_collator=lambda b: collate(processor, b),
                      optimizers=(opt, sched), callbacks=[clip])
    trainer.train()
    assert len(seen) == 4 and max(seen) <= 1e-3 * (1 + 1e-4) and clip.last_norm > 1e-3  # clipped before each step
    assert not opt._hooks  # hooks removed at the end of training
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] < 1e-3
    moved = 0
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        sel = torch.zeros(p.numel(), dtype=torch.bool)
        if n in masks:
            sel[masks[n]] = True
        assert torch.equal(p.detach().reshape(-1)[~sel], q.detach().reshape(-1)[~sel]), n
        moved += int((p.detach().reshape(-1)[sel] != q.detach().reshape(-1)[sel]).sum())
    assert moved > 0



def _example():
    """examples/trainer_piece.py as a module."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "examples" / "trainer_piece.py"
    spec = importlib.util.spec_from_file_location("trainer_piece", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_trainer_example_runs_the_clis_default_method(tmp_path):
    """examples/trainer_piece.py's default_method and a Trainer with PieceCallback(regulariser=) against the CLI's
    loop (METHODS["piece-f"] at the default budget, train_task) on the same 16 examples (a batch of 16: every step
    holds all of them) and the same held rows: the same masks, the same cache, and the same regularised loss at every
    step."""
    import dataclasses

    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    from piece_mm.budget import Budget
    from piece_mm.continual import METHODS, make_scheduler, train_task
    from piece_mm.eval.generate import generate
    from piece_mm.methods import TaskContext
    from piece_mm.tasks.sequence import Task

    ex = _example()
    base, processor = pm.load_model("llava")
    train = world.task_set("size", "train", 16, seed=2)
    budget = Budget.from_yaml("default").to_dict()
    budget["distill"]["held"] |= {"pool": 12, "per_step": 4}  # fewer held rows: a faster test
    steps, seed = 3, 5
    path = tmp_path / "budget.yaml"
    import yaml
    path.write_text(yaml.safe_dump({k: v for k, v in budget.items() if k != "path"}))

    cli = copy.deepcopy(base)
    task = Task("size", train, [], "exact")
    ctx = TaskContext(tasks=[task], output=tmp_path / "cli", lr=budget["lr"], seed=seed, steps=steps, batch_size=16,
                      budget=dict(budget, path=str(path)),
                      generate=lambda m, p, e, n: generate(m, p, e, batch_size=64, max_new_tokens=n))
    tuning = METHODS["piece-f"].for_task(cli, processor, task, ctx)
    losses = []
    train_task(cli, processor, task, tuning.optimizer, make_scheduler(tuning.optimizer, steps), steps, 16, seed, "t",
               regulariser=tuning.regulariser, held=tuning.held_examples, held_per_step=tuning.held_per_step,
               on_step=lambda done, loss: losses.append(loss))
    tuning.close()

    model = copy.deepcopy(base)
    masks, opt, reg = ex.default_method(model, processor, train, budget=str(path), seed=seed)
    assert masks.keys() == tuning.masks.keys() and all(torch.equal(masks[n], tuning.masks[n]) for n in masks)
    assert [(h.prompt, h.answer) for h in reg.held] == [(h.prompt, h.answer) for h in tuning.held_examples]
    assert torch.equal(reg.cache.values, tuning.regulariser.cache.values)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=16,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             max_grad_norm=0.0)
    callback = pm.PieceCallback(max_grad_norm=1.0, regulariser=reg)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=reg.collator(processor, reg.held_options["per_step"], seed=seed),
                      optimizers=(opt, get_cosine_schedule_with_warmup(opt, 1, steps)), callbacks=[callback])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert callback.last_term is not None and callback.last_term > 0
    assert logged == pytest.approx(losses, abs=2e-4), (logged, losses)  # Trainer logs 4 decimals
    assert dataclasses.is_dataclass(reg) and not callback._handles  # the hooks are gone when training ends
