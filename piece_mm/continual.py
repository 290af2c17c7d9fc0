"""The continual loop: for each task, build the method's optimizer, train, then evaluate every task and the general
held-out set. Methods are registered by name; a method is one function that returns the task's optimizer."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from piece_mm.batching import collate, training_batches
from piece_mm.components import split_components
from piece_mm.delta import save_delta, save_masks
from piece_mm.importance import estimate_importance
from piece_mm.select import budget_arg, jaccard, mask_summary, select_masks
from piece_mm.sparse import sparse_optimizer
from tasks.base import exact_match
from tasks.sequence import Sequence

# name -> fn(model, processor, task, cfg) -> torch.optim.Optimizer over the weights the method tunes for this task
METHODS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


@register("seqft")
def seqft(model, processor, task, cfg):
    """Full fine-tuning, AdamW recreated for each task."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=0.0)


PER_SAMPLE_CHUNK = 16  # samples per batched pass when the budget scores per sample (score_batch_size: 1)


def _sparse_method(estimator: str):
    def make(model, processor, task, cfg):
        """Score the task's training examples on the current model, pick the top weights per component within the
        budget, and return a sparse Adam over just those (recreated per task, as in PIECE)."""
        b = cfg["budget"]
        parts = split_components(model, exclude=b["exclude"], rules=b["components"])
        examples = task.train[: b["score_examples"]]
        per_sample = b["score_batch_size"] == 1  # exact per-sample scores from batched passes, not a batch-1 loop
        bs = PER_SAMPLE_CHUNK if per_sample else b["score_batch_size"]
        batches = (collate(processor, examples[i:i + bs]) for i in range(0, len(examples), bs))
        scores = estimate_importance(model, batches, estimator, names=[n for c in parts.values() for n in c],
                                     seed=cfg["seed"], per_sample=per_sample)
        masks = select_masks(scores, parts, budget_arg(b), pool=b["pool"])
        opt = sparse_optimizer(model, masks, torch.optim.AdamW, lr=cfg["lr"], betas=tuple(b["betas"]),
                               weight_decay=b["weight_decay"])
        opt.parts = parts
        return opt
    make.__name__ = estimator
    return make


SPARSE_METHODS = ("piece-f", "piece-s", "grad-magnitude", "magnitude", "random")
for _name in SPARSE_METHODS:
    register(_name)(_sparse_method(_name))


def component_counts(model, rules: dict | None = None) -> dict:
    """Trainable elements per component (token embeddings counted with the LLM)."""
    parts = split_components(model, exclude=(), rules=rules)
    params = dict(model.named_parameters())
    counts = {c: sum(params[n].numel() for n in names if params[n].requires_grad) for c, names in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def evaluate(model, processor, seq: Sequence, eval_limit: int | None, batch_size: int, desc: str):
    """(task scores in sequence order, general metrics, the first captions with their references)."""
    from eval.captioning import general_scores
    from eval.generate import generate

    tests = [t.test[:eval_limit] for t in seq.tasks]
    caps, vqa = seq.captions[:eval_limit], seq.vqa[:eval_limit]
    with tqdm(total=sum(map(len, tests)) + len(caps) + len(vqa), desc=desc, file=sys.stderr, leave=False,
              mininterval=2) as bar:
        scores = []
        for task, examples in zip(seq.tasks, tests):
            answers = generate(model, processor, examples, batch_size=batch_size, max_new_tokens=8, progress=bar)
            scores.append(sum(exact_match(a, ex.answer) for a, ex in zip(answers, examples)) / len(examples))
        general, preds = general_scores(model, processor, caps, vqa, batch_size=batch_size, progress=bar)
    samples = [(p, ex.refs[0]) for p, ex in zip(preds[:3], caps)]
    return scores, general, samples


def train_task(model, processor, task, opt, steps: int, batch_size: int, seed: int, desc: str) -> float:
    """`steps` optimizer steps on the task with a cosine schedule and 10 % warmup; returns the last loss."""
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    device = next(model.parameters()).device
    model.train()
    loss_value = float("nan")
    bar = tqdm(training_batches(processor, task.train, batch_size, steps, seed), total=steps, desc=desc,
               file=sys.stderr, leave=False, mininterval=2)
    for step, batch in enumerate(bar):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        if hasattr(opt, "clip_grad_norm_"):  # sparse: clip by the norm of the gradient it actually follows
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def run(model, processor, seq: Sequence, *, model_name: str, method: str, output: Path, seed: int, steps: int,
        batch_size: int, lr: float, eval_limit: int | None, budget: dict | None = None, eval_batch_size: int = 64,
        log=print) -> dict:
    from eval.cl_metrics import summary
    from eval.report import write_report

    if method not in METHODS:
        raise KeyError(method)
    t0 = time.time()
    cfg = {"lr": lr, "seed": seed, "steps": steps, "batch_size": batch_size, "budget": budget}
    selection, all_masks = [], []
    names = [t.name for t in seq.tasks]
    trainable = {"vision": 0, "projector": 0, "llm": 0, "total": 0}
    scores, general, samples = evaluate(model, processor, seq, eval_limit, eval_batch_size, "eval before")
    R, before, after, all_samples = [scores], general, [], [samples]
    log(f"before: scores {_fmt(scores)}  CIDEr {general['CIDEr']:.3f}  VQA {general.get('VQA', float('nan')):.3f}")
    for i, task in enumerate(seq.tasks):
        torch.manual_seed(seed * 1000 + i)
        cfg["seed"] = seed * 1000 + i
        opt = METHODS[method](model, processor, task, cfg)
        masks = getattr(opt, "masks", None)
        if masks is not None:
            summ = mask_summary(masks, opt.parts)
            counts = {c: summ[c]["chosen"] for c in opt.parts} | {"total": summ["total"]}
            selection.append({"task": task.name, **summ})
            all_masks.append(masks)
            save_masks(masks, output / "masks" / f"{i + 1}-{task.name}.safetensors", {"task": task.name})
            log(f"{task.name}: tuning {summ['total']:,} weights (" +
                ", ".join(f"{c} {summ[c]['chosen']:,}" for c in opt.parts) + ")")
        else:
            counts = component_counts(model, (budget or {}).get("components"))
        trainable = {k: max(trainable[k], counts[k]) for k in counts}
        loss = train_task(model, processor, task, opt, steps, batch_size, seed * 1000 + i,
                          desc=f"task {i + 1}/{len(seq.tasks)} {task.name}")
        if hasattr(opt, "close"):
            opt.close()  # the sparse optimizer's gradient hooks would hide the next task's scoring gradients
        if masks is not None:
            save_delta(model, masks, output / "deltas" / f"{i + 1}-{task.name}.safetensors", {"task": task.name})
        scores, general, samples = evaluate(model, processor, seq, eval_limit, eval_batch_size, f"eval {task.name}")
        R.append(scores)
        after.append(general)
        all_samples.append(samples)
        log(f"after {task.name}: loss {loss:.3f}  scores {_fmt(scores)}  CIDEr {general['CIDEr']:.3f}  "
            f"VQA {general.get('VQA', float('nan')):.3f}")
    metrics = {"model": model_name, "method": method, "seed": seed, "tasks": names, "scores": R,
               "general": {"before": before, "after": after}, "summary": summary(R, before, after),
               "trainable": trainable, "time_s": time.time() - t0}
    if selection:
        metrics["budget"] = budget["path"]
        metrics["selection"] = selection
        metrics["mask_jaccard"] = [[jaccard(a, b) for b in all_masks] for a in all_masks]
    _atomic_write(output / "metrics.json", json.dumps(metrics, indent=1))
    write_report(output, metrics, all_samples)
    return metrics


def _fmt(xs) -> str:
    return "[" + " ".join(f"{x:.2f}" for x in xs) + "]"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
