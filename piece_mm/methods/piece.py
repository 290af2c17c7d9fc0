"""The sparse methods: piece-f, piece-s, grad-magnitude, magnitude, random and trace. For each task they score the
task's training examples on the current model (piece_mm/importance/), choose the top weights of each component
within the budget (select.py), and tune only those with a sparse AdamW (sparse.py), recreated per task as in PIECE.
They run the same way on FSDP2 shards (shard.py), except random and trace.

The budget's `distill` adds weight x T² x KL(teacher ‖ student) to every task's loss (LwF's term, from the first task
on), where the teacher is the model as the task began. Since a sparse task moves only its chosen elements, that
teacher is the same model with those elements put back to their values at the task's start, for one forward
pass: it costs their k values, not a copy of the model. With distill.held the term also holds the model on the task's
images under prompts the task does not show (methods/held.py): those rows join each step's batch."""
from __future__ import annotations

import torch

from piece_mm import dist, shard
from piece_mm.batching import HELD, IGNORE_INDEX, collate, model_inputs
from piece_mm.budget import distill_of, held_of
from piece_mm.components import split_components
from piece_mm.errors import InputError
from piece_mm.importance import estimate_importance
from piece_mm.methods import Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.methods.lwf import distillation_loss
from piece_mm.models import activation_checkpointing
from piece_mm.select import budget_arg, select_masks
from piece_mm.sparse import sparse_optimizer

PER_SAMPLE_CHUNK = 16  # samples per batched pass when the budget scores per sample (score_batch_size: 1)


def _sparse_method(estimator: str):
    def make(model, processor, task, cfg, masks=None):
        """Score the task's training examples on the current model, pick the top weights per component within the
        budget, and return a sparse Adam over just those (recreated per task, as in PIECE)."""
        b = cfg["budget"]
        parts = split_components(model, exclude=b["exclude"], rules=b["components"])
        held = None
        if held_of(b):  # made first, with the model as the task begins: the teacher's own answers
            from piece_mm.methods.held import held_examples
            held = held_examples(model, processor, task, cfg, held_of(b))
        if masks is None:
            masks = _choose(model, processor, task, cfg, parts, held)
        opt = sparse_optimizer(model, masks, torch.optim.AdamW, lr=cfg["lr"], betas=tuple(b["betas"]),
                               weight_decay=b["weight_decay"])
        tuning = Tuning(opt, masks=opt.masks, parts=parts, close=opt.close)
        if distill_of(b):
            tuning.extra_loss, tuning.extra_per_position = _distillation(model, opt, cfg), True
            if held is not None:  # two parts, each a mean over its own positions (distill_parts)
                tuning.held_examples, tuning.held_per_step = held, held_of(b)["per_step"]
                tuning.extra_per_position = lambda batch: [k.sum() for k in distill_parts(batch, distill_of(b))]
        return tuning

    def _choose(model, processor, task, cfg, parts, held=None):
        b = cfg["budget"]
        examples = task.train[: b["score_examples"]]
        per_sample = b["score_batch_size"] == 1  # exact per-sample scores from batched passes, not a batch-1 loop
        bs = PER_SAMPLE_CHUNK if per_sample else b["score_batch_size"]
        chunks = [examples[i:i + bs] for i in range(0, len(examples), bs)]
        if shard.is_fsdp(model):  # every scoring batch, this rank's share of its examples (FSDP2 sums the shares)
            batches = (_share_batch(processor, c) for c in chunks)
        else:
            batches = (collate(processor, c) for c in dist.share(chunks))  # this process's whole batches
        options = {"seed": cfg["seed"], "per_sample": per_sample, "accumulate": b["score_memory"], "log": cfg["log"]}
        if estimator == "trace":  # the probe's length follows the task's: a tenth of its steps unless set
            t = b["trace"]
            # the earlier tasks' update sketches, for this task's specificity; <output>/trace/ keeps them, so a
            # resumed run has them too
            history = [load_tensors(state_file(cfg, "trace", j)) for j in range(cfg["index"])]
            options = {"probe_steps": t["probe_steps"] or max(1, cfg["steps"] // 10), "probe_lr": t["probe_lr"],
                       "level": t["level"], "mix": t["mix"], "specificity_rule": t["specificity"],
                       "strength": t["strength"], "threshold": t["threshold"], "history": history, "probe_out": {}}
        if estimator in GRADIENT_SCORES and b["pool"] == "component":
            # a component with no budget is not scored: on a 7B model that spares its fp32 sums (the vision tower's
            # are ~1.2 GB), and the other components' gradients, hence scores, are the same without it
            parts = {c: names if b["fractions"].get(c, 0) > 0 else [] for c, names in parts.items()}
        with activation_checkpointing(model, cfg["gradient_checkpointing"]):
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
            with activation_checkpointing(model, cfg["gradient_checkpointing"]):
                on_held = estimate_importance(model, hb, "piece-f", names=list(scores),
                                              accumulate=b["score_memory"], log=None)
            scores = protect_scores(scores, on_held, h["protect"], sharded=shard.is_fsdp(model))
        if estimator == "trace" and "sketch" in options["probe_out"]:
            if cfg["main"]:
                save_tensors(options["probe_out"]["sketch"], state_file(cfg, "trace", cfg["index"]))
            dist.barrier()  # every process reads it as history for the next task
        shards = dict(model.named_parameters()) if shard.is_fsdp(model) else None
        return select_masks(scores, parts, budget_arg(b), pool=b["pool"], granularity=b["granularity"],
                            shards=shards)
    make.__name__ = estimator
    return make


def _distillation(model, opt, cfg):
    """The budget's distill term for this task (module docstring). The chosen elements' values at the task's start
    are saved (<output>/distill/<task>.safetensors), so a task resumed midway distils from the same teacher."""
    d, path = distill_of(cfg["budget"]), state_file(cfg, "distill", cfg["index"])
    if cfg["resumed"]:
        try:
            start = opt.values_from(load_tensors(path))
        except (KeyError, ValueError) as e:  # a file of another run, or of another mask
            raise InputError(f"{path}: not the start values of this task's chosen weights ({e})") from None
    else:
        start = opt.chosen_values()
        whole = shard.gather_values(model, opt.masks)  # on shards: a collective, the values on the first process
        if cfg["main"]:
            named = dict(model.named_parameters())
            save_tensors(whole or {n: named[n].detach().reshape(-1)[idx.to(torch.int64)]
                                   for n, idx in opt.masks.items()}, path)

    def extra_loss(model, batch, out):
        was, sharded = model.training, shard.is_fsdp(model)
        with torch.no_grad():
            if sharded:  # FSDP2 units that stay whole after the student's forward would not see the teacher's values
                shard.reshard(model)
            with opt.holding(start):
                model.eval()  # the teacher as LwF's: in eval mode
                try:
                    teacher = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
                finally:
                    model.train(was)
                    if sharded:  # nor would backward see the student's again: it gathers them anew
                        shard.reshard(model)
        keep, held = distill_parts(batch, d)
        task = d["weight"] * distillation_loss(out.logits, teacher, keep, d["temperature"])
        if not (d.get("held") or {}).get("weight"):
            return task
        # with held prompts: two parts, each a mean over its own positions (the loop weights each by its share)
        zero = out.logits.sum() * 0.0  # a batch without held rows (a micro-batch's share) holds none
        return [task, d["held"]["weight"] * distillation_loss(out.logits, teacher, held, d["temperature"])
                if held.any() else zero]
    return extra_loss


def distill_parts(batch: dict, d: dict) -> tuple:
    """([B, L] bool, [B, L] bool): the positions where the distill term holds the task's own rows (every non-padding
    position, less the answer predictions with distill.answers false), and those where it holds the held rows (their
    answer predictions, batch["held"]; none without)."""
    keep = batch["attention_mask"].bool()  # [B, L]
    if not d.get("answers", True):  # not where the task's answer is predicted: there the term pulls against it
        keep = keep.clone()
        keep[:, :-1] &= batch["labels"][:, 1:] == IGNORE_INDEX
    held = batch.get(HELD)
    if held is None:
        return keep, torch.zeros_like(keep)
    return keep & ~held.any(-1, keepdim=True), held  # the task's own rows, as without held prompts


def _share_batch(processor, examples: list) -> dict:
    """This rank's share of one scoring batch. A rank left without an example (a batch smaller than the process
    count) runs the first one with no answer token counted, so it joins FSDP2's collectives and adds nothing."""
    mine = examples[dist.rank()::dist.world()]
    batch = collate(processor, mine or examples[:1])
    if not mine:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def _trace_cosine(cfg) -> dict:
    """TRACE's entry in metrics.json: the cosine of every pair of tasks' update sketches."""
    from piece_mm.importance.trace import cosine_matrix
    sketches = [load_tensors(state_file(cfg, "trace", i)) for i in range(len(cfg["tasks"]))]
    return {"trace_cosine": cosine_matrix(sketches)}


SPARSE_METHODS = ("piece-f", "piece-s", "grad-magnitude", "magnitude", "random", "trace")
GRADIENT_SCORES = ("piece-f", "piece-s", "grad-magnitude")  # one gradient pass, element by element
SHARDED_METHODS = GRADIENT_SCORES + ("magnitude",)  # what runs on FSDP2 shards (piece_mm/shard.py)
for _name in SPARSE_METHODS:
    register(_name, sparse=True, sharded=_name in SHARDED_METHODS,
             metrics=_trace_cosine if _name == "trace" else None)(_sparse_method(_name))
