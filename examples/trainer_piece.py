"""The default method (as `python -m piece_mm.train` runs it) in a transformers.Trainer script, on the tiny LLaVA and
the world's `size` task: the default budget's 3 % of the LLM chosen by PIECE-F, tuned at its lr with its distillation
term (pm.Distillation: the model as the task begins, cached once, held on the task's rows and on held rows of other
prompts).

    python examples/trainer_piece.py [--steps 60] [--output runs/trainer-piece]

The same script on FSDP2 shards, N processes (each holds 1/N of every weight, of the scores and of the optimizer
state; the global batch stays 16, so the run takes the same steps as one process):

    accelerate launch --multi_gpu --num_processes N examples/trainer_piece.py

The model is then sharded by transformers as it loads (DistributedConfig), which the Trainer takes as it is. Launch
with a plain multi-process config, not configs/accelerate/fsdp2.yaml: under accelerate's FSDP plugin, Trainer refuses
an optimizer passed in `optimizers=`. The lines that make an ordinary Trainer script a PIECE one are marked "# PIECE";
those marked "# shards" are what FSDP2 adds."""
import argparse
import sys

import torch
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import piece_mm as pm
from piece_mm import shard
from piece_mm.batching import collate
from piece_mm.tasks import world
from piece_mm.tasks.base import exact_match

BATCH = 16


def accuracy(model, processor, examples):
    from piece_mm.eval.generate import generate
    with shard.whole_root(model):  # shards: generate calls the vision tower outside the model's forward
        answers = generate(model, processor, examples, batch_size=32, max_new_tokens=8)
    return sum(exact_match(a, ex.answer) for a, ex in zip(answers, examples)) / len(examples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output", default="runs/trainer-piece")
    args = ap.parse_args()
    if shard.requested() is not None:  # launched with accelerate's FSDP or DeepSpeed plugin
        print(f"examples/trainer_piece.py: launched with accelerate's {shard.requested()} config, under which the "
              "Trainer refuses optimizers=(...); launch with --multi_gpu --num_processes N: the model is sharded as "
              "it loads", file=sys.stderr)
        sys.exit(2)

    targs = TrainingArguments(output_dir=args.output, max_steps=args.steps, use_cpu=not torch.cuda.is_available(),
                              max_grad_norm=0.0,  # PIECE: the callback clips the selected gradient instead
                              report_to=[], save_strategy="no", logging_steps=20, remove_unused_columns=False,
                              disable_tqdm=True)
    n, rank = targs.world_size, targs.process_index
    targs.per_device_train_batch_size = BATCH // n
    if n > 1:                                                                             # shards
        from transformers.distributed import DistributedConfig
        model, processor = pm.load_model("llava", distributed_config=DistributedConfig(fsdp_size=n))
    else:
        model, processor = pm.load_model("llava")
    train = world.task_set("size", "train", 256, seed=1)
    test = world.task_set("size", "test", 64, seed=2)
    base = {k: shard.local(p).detach().clone() for k, p in model.named_parameters()}
    say = print if rank == 0 else (lambda *a: None)
    say(f"size task before: accuracy {accuracy(model, processor, test):.2f}")

    masks, opt, reg = default_method(model, processor, train, rank, n)                     # PIECE
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)

    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=reg.collator(processor, reg.held_options["per_step"], rank=rank, world=n),  # PIECE
                      optimizers=(opt, sched),                                            # PIECE
                      callbacks=[pm.PieceCallback(max_grad_norm=1.0, regulariser=reg)])   # PIECE
    trainer.train()

    model.eval()
    frozen = _frozen_elsewhere(model, base, masks)
    say(f"size task after: accuracy {accuracy(model, processor, test):.2f}; tuned "
        f"{sum(m.numel() for m in masks.values()):,} weights; every other weight bit-identical: {frozen}")
    pm.save_delta(model, masks, f"{args.output}/size-delta.safetensors")                  # PIECE
    say(f"wrote {args.output}/size-delta.safetensors")


def default_method(model, processor, train, rank=0, n=1, budget="default", seed=0):
    """(masks, sparse optimizer, prepared regulariser) as the CLI's default method makes them for a task, before it
    trains: the budget's held rows (the model's own replies), PIECE-F over the training examples in batches of 16 (each
    process scoring its share of each), the top weights per component, and the teacher cached once."""
    b = pm.Budget.from_yaml(budget)
    reg = pm.Distillation.from_budget(b)                                                 # PIECE
    held = reg.held_rows(model, processor, train, _greedy, seed=seed)                    # PIECE
    parts = {c: names if b.fractions.get(c, 0) > 0 else []  # a component with no budget is not scored  # PIECE
             for c, names in pm.split_components(model, exclude=b.exclude).items()}
    batches = [collate(processor, train[i:i + BATCH][rank::n]) for i in range(0, len(train), BATCH)]  # PIECE
    scores = pm.estimate_importance(model, batches, "piece-f",                           # PIECE
                                    names=[k for names in parts.values() for k in names])
    masks = pm.select_masks(scores, parts, b,                                            # PIECE
                            shards=dict(model.named_parameters()) if n > 1 else None)    # shards
    reg.prepare(model, processor, train, held)                                           # PIECE
    if n > 1:                                                                            # shards
        shard.reshard(model)
    opt = pm.sparse_optimizer(model, masks, torch.optim.AdamW, lr=b.lr, betas=tuple(b.betas),  # PIECE
                              weight_decay=b.weight_decay)
    return masks, opt, reg


def _greedy(model, processor, examples, max_new_tokens):
    from piece_mm.eval.generate import generate
    with shard.whole_root(model):
        return generate(model, processor, examples, batch_size=64, max_new_tokens=max_new_tokens)


def _frozen_elsewhere(model, base, masks) -> bool:
    """Every unselected element equals the base, bit for bit (on shards: in every process's shard)."""
    same = True
    for k, p in model.named_parameters():
        now = shard.local(p).detach().reshape(-1)
        keep = torch.ones(now.numel(), dtype=torch.bool)
        if k in masks:
            keep[shard.local_part(masks[k], p)] = False
        same &= torch.equal(now[keep].view(torch.int32), base[k].reshape(-1)[keep].view(torch.int32))
    if torch.distributed.is_initialized():
        flag = torch.tensor([int(same)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        same = bool(flag.item())
    return same


if __name__ == "__main__":
    main()
