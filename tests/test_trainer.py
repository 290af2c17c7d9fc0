import copy

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

