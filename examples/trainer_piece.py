"""PIECE in a transformers.Trainer script, on the tiny LLaVA and the world's `size` task.

    python examples/trainer_piece.py [--steps 60] [--output runs/trainer-piece]

The lines that make an ordinary Trainer script a PIECE one are marked "# PIECE"."""
import argparse

import torch
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import piece_mm as pm
from piece_mm.batching import collate
from tasks import world
from tasks.base import exact_match


def accuracy(model, processor, examples):
    from eval.generate import generate
    answers = generate(model, processor, examples, batch_size=32, max_new_tokens=8)
    return sum(exact_match(a, ex.answer) for a, ex in zip(answers, examples)) / len(examples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output", default="runs/trainer-piece")
    args = ap.parse_args()

    model, processor = pm.load_model("llava")
    train = world.task_set("size", "train", 256, seed=1)
    test = world.task_set("size", "test", 64, seed=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    print(f"size task before: accuracy {accuracy(model, processor, test):.2f}")

    parts = pm.split_components(model)                                                   # PIECE
    batches = [collate(processor, train[i:i + 16]) for i in range(0, 128, 16)]           # PIECE
    scores = pm.estimate_importance(model, batches, "piece-f",                           # PIECE
                                    names=[n for c in parts.values() for n in c])
    masks = pm.select_masks(scores, parts, {"vision": 0.0, "projector": 0.0, "llm": 0.03})  # PIECE
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95))  # PIECE
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)

    targs = TrainingArguments(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=16,
                              max_grad_norm=0.0,  # PIECE: the callback clips the selected gradient instead
                              use_cpu=True, report_to=[], save_strategy="no", logging_steps=20,
                              remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=lambda b: collate(processor, b),
                      optimizers=(opt, sched),                                            # PIECE
                      callbacks=[pm.PieceCallback(max_grad_norm=1.0)])                    # PIECE
    trainer.train()

    model.eval()
    frozen = all(torch.equal(p.detach().reshape(-1)[_unselected(masks, n, p)], base[n].reshape(-1)[
        _unselected(masks, n, p)]) for n, p in model.named_parameters())
    print(f"size task after: accuracy {accuracy(model, processor, test):.2f}; tuned "
          f"{sum(m.numel() for m in masks.values()):,} weights; every other weight bit-identical: {frozen}")
    pm.save_delta(model, masks, f"{args.output}/size-delta.safetensors")                  # PIECE
    print(f"wrote {args.output}/size-delta.safetensors")


def _unselected(masks, name, p):
    keep = torch.ones(p.numel(), dtype=torch.bool)
    if name in masks:
        keep[masks[name]] = False
    return keep


if __name__ == "__main__":
    main()
