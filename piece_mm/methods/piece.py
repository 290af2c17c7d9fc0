"""The sparse methods: piece-f, piece-s, grad-magnitude, magnitude, random and trace. For each task they score the
task's training examples on the current model (piece_mm/importance/), choose the top weights of each component
within the budget (select.py), and tune only those with a sparse AdamW (sparse.py), recreated per task as in PIECE.
They run the same way on FSDP2 shards (shard.py), except random and trace.

The budget's `distill` adds weight x T² x KL(teacher ‖ student) to every task's loss (LwF's term, from the first task
on), where the teacher is the model as the task began: regularise.Distillation, whose teacher runs once per example
before the first step (its top-k log-probabilities are cached in <output>/distill/<task>.teacher.safetensors, which a
resumed task reads back). With distill.held the term also holds the model on the task's images under prompts the task
does not show (methods/held.py): those rows join each step's batch."""
from __future__ import annotations

from pathlib import Path

import torch

from piece_mm import dist, shard
from piece_mm.batching import IGNORE_INDEX, collate
from piece_mm.budget import distill_of, held_of
from piece_mm.components import split_components
from piece_mm.importance import estimate_importance
from piece_mm.methods import Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.models import activation_checkpointing
from piece_mm.regularise import Distillation
from piece_mm.select import budget_arg, select_masks
from piece_mm.sparse import sparse_optimizer

PER_SAMPLE_CHUNK = 16  # samples per batched pass when the budget scores per sample (score_batch_size: 1)


def _sparse_method(estimator: str):
    def make(model, processor, task, ctx, masks=None):
        """Score the task's training examples on the current model, pick the top weights per component within the
        budget, and return a sparse Adam over just those (recreated per task, as in PIECE)."""
        b = ctx.budget
        parts = split_components(model, exclude=b["exclude"], rules=b["components"])
        held, base, on_base = None, None, ()
        if held_of(b):  # made first, with the model as the task begins: the teacher's own answers
            from piece_mm.methods.held import bank_rows, earlier_prompts, held_examples
            base = _base(model, ctx)
            held = held_examples(model, processor, task, ctx, held_of(b), base)
            if base is not None:
                on_base = bank_rows(held, earlier_prompts(ctx.tasks[:ctx.index], held_of(b)["earlier"]))
        if masks is None:
            masks = _choose(model, processor, task, ctx, parts, held)
            if held_of(b) and held_of(b)["bank_teacher"] == "base" and ctx.main:  # before a step: base values
                from piece_mm.methods.held import BASE_FILE, record_base
                record_base(model, masks, Path(ctx.output) / "distill" / BASE_FILE)
        tuning = Tuning(None, held_examples=held, held_per_step=held_of(b)["per_step"] if held else 0)
        if distill_of(b):  # the teacher, once per example, before a weight moves (or read back, resumed)
            tuning.regulariser = teacher_cache(model, processor, task.train, held, ctx, base, on_base)
        opt = sparse_optimizer(model, masks, torch.optim.AdamW, lr=ctx.lr, betas=tuple(b["betas"]),
                               weight_decay=b["weight_decay"])
        tuning.optimizer, tuning.masks, tuning.parts, tuning.close = opt, opt.masks, parts, opt.close
        return tuning

    def _choose(model, processor, task, ctx, parts, held=None):
        b = ctx.budget
        examples = task.train[: b["score_examples"]]
        per_sample = b["score_batch_size"] == 1  # exact per-sample scores from batched passes, not a batch-1 loop
        bs = PER_SAMPLE_CHUNK if per_sample else b["score_batch_size"]
        chunks = [examples[i:i + bs] for i in range(0, len(examples), bs)]
        if shard.is_fsdp(model):  # every scoring batch, this rank's share of its examples (FSDP2 sums the shares)
            batches = (_share_batch(processor, c) for c in chunks)
        else:
            batches = (collate(processor, c) for c in dist.share(chunks))  # this process's whole batches
        options = {"seed": ctx.seed, "per_sample": per_sample, "accumulate": b["score_memory"], "log": ctx.log}
        if estimator == "trace":  # the probe's length follows the task's: a tenth of its steps unless set
            t = b["trace"]
            # the earlier tasks' update sketches, for this task's specificity; <output>/trace/ keeps them, so a
            # resumed run has them too
            history = [load_tensors(state_file(ctx, "trace", j)) for j in range(ctx.index)]
            options = {"probe_steps": t["probe_steps"] or max(1, ctx.steps // 10), "probe_lr": t["probe_lr"],
                       "level": t["level"], "mix": t["mix"], "specificity_rule": t["specificity"],
                       "strength": t["strength"], "threshold": t["threshold"], "history": history, "probe_out": {}}
        if estimator in GRADIENT_SCORES and b["pool"] == "component":
            # a component with no budget is not scored: on a 7B model that spares its fp32 sums (the vision tower's
            # are ~1.2 GB), and the other components' gradients, hence scores, are the same without it
            parts = {c: names if b["fractions"].get(c, 0) > 0 else [] for c, names in parts.items()}
        with activation_checkpointing(model, ctx.gradient_checkpointing):
            scores = estimate_importance(model, batches, estimator, names=[n for c in parts.values() for n in c],
                                         **options)
        h = held_of(b)
        if held and h["protect"] > 0 and estimator in GRADIENT_SCORES:  # the held prompts' own PIECE-F, against it
            from piece_mm.methods.held import protect_scores
            chunks = [held[i:i + bs] for i in range(0, len(held), bs)]
            if shard.is_fsdp(model):
                hb = (_share_batch(processor, c) for c in chunks)
            else:
                hb = (collate(processor, c) for c in dist.share(chunks))
            with activation_checkpointing(model, ctx.gradient_checkpointing):
                on_held = estimate_importance(model, hb, "piece-f", names=list(scores),
                                              accumulate=b["score_memory"], log=None)
            scores = protect_scores(scores, on_held, h["protect"], sharded=shard.is_fsdp(model))
        if b.get("keep_earlier") and ctx.index > 0:  # the earlier tasks' weights stay theirs: never chosen again
            from piece_mm.delta import load_masks
            low = min([float(v.min()) for v in scores.values() if v.numel()] + [0.0]) - 1.0  # below every score,
            # and negative, which pool auto's score mass counts as 0
            for j in range(ctx.index):
                earlier = load_masks(Path(ctx.output) / "masks" / f"{j + 1}-{ctx.tasks[j].name}.safetensors")
                for n, idx in earlier.items():
                    if n in scores:
                        scores[n].view(-1)[idx.to(scores[n].device)] = low
        if estimator == "trace" and "sketch" in options["probe_out"]:
            if ctx.main:
                save_tensors(options["probe_out"]["sketch"], state_file(ctx, "trace", ctx.index))
            dist.barrier()  # every process reads it as history for the next task
        shards = dict(model.named_parameters()) if shard.is_fsdp(model) else None
        return select_masks(scores, parts, budget_arg(b), pool=b["pool"], granularity=b["granularity"],
                            shards=shards)
    make.__name__ = estimator
    return make


def _base(model, ctx):
    """With distill.held.bank_teacher: base, from the second task on, a context manager factory under which the
    model is the base (methods/held.py, at_base); else None."""
    h = held_of(ctx.budget)
    if not h or h["bank_teacher"] != "base" or ctx.index == 0:  # the first task begins at the base
        return None
    from piece_mm.delta import load_delta
    from piece_mm.errors import InputError
    from piece_mm.methods.held import BASE_FILE, at_base
    if shard.is_fsdp(model):
        raise InputError("distill.held.bank_teacher: base is not supported on FSDP2 shards; use task")
    path = Path(ctx.output) / "distill" / BASE_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found; distill.held.bank_teacher: base records the base values there as each "
                         "task's mask is chosen (a run begun with bank_teacher: task cannot switch)")
    record = load_delta(path)
    return lambda: at_base(model, record)


def teacher_cache(model, processor, examples: list, held, ctx, base=None, on_base=()) -> Distillation:
    """The budget's distill term for this task, its teacher the model as it is now (the held rows numbered in
    `on_base` the base, under `base`): run over the task's training examples and held rows once and cached in
    <distill.cache_dir or output/distill>/<task>.teacher.safetensors, which a resumed task reads back instead."""
    d = distill_of(ctx.budget)
    where = Path(d["cache_dir"]) if d.get("cache_dir") else Path(ctx.output) / "distill"
    path = where / f"{ctx.index + 1}-{ctx.tasks[ctx.index].name}.teacher.safetensors"
    b = ctx.budget
    reg = Distillation.from_budget(b).prepare(
        model, processor, examples, held or (), batch_size=PER_SAMPLE_CHUNK if b["score_batch_size"] == 1
        else b["score_batch_size"], path=path, reuse=ctx.resumed, log=ctx.log, base=base, at_base=on_base)
    if shard.is_fsdp(model):  # FSDP2 units that stay whole after a forward with no backward: back on their shards
        shard.reshard(model)
    return reg


def _share_batch(processor, examples: list) -> dict:
    """This rank's share of one scoring batch. A rank left without an example (a batch smaller than the process
    count) runs the first one with no answer token counted, so it joins FSDP2's collectives and adds nothing."""
    mine = examples[dist.rank()::dist.world()]
    batch = collate(processor, mine or examples[:1])
    if not mine:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def _trace_cosine(ctx) -> dict:
    """TRACE's entry in metrics.json: the cosine of every pair of tasks' update sketches."""
    from piece_mm.importance.trace import cosine_matrix
    sketches = [load_tensors(state_file(ctx, "trace", i)) for i in range(len(ctx.tasks))]
    return {"trace_cosine": cosine_matrix(sketches)}


SPARSE_METHODS = ("piece-f", "piece-s", "grad-magnitude", "magnitude", "random", "trace")
GRADIENT_SCORES = ("piece-f", "piece-s", "grad-magnitude")  # one gradient pass, element by element
SHARDED_METHODS = GRADIENT_SCORES + ("magnitude",)  # what runs on FSDP2 shards (piece_mm/shard.py)
for _name in SPARSE_METHODS:
    register(_name, kind="sparse", sharded=_name in SHARDED_METHODS, regulariser="distill",
             metrics=_trace_cosine if _name == "trace" else None)(_sparse_method(_name))
