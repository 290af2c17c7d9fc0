"""The continual loop: for each task, build the method's optimizer, train, then evaluate every task and the general
held-out set. Methods are registered by name (piece_mm/methods/__init__.py describes one); the sparse ones are
registered here, the baselines in piece_mm/methods/."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from piece_mm import checkpoint, dist, shard
from piece_mm.batching import IGNORE_INDEX, collate, global_answer_tokens, training_batches
from piece_mm.components import split_components
from piece_mm.delta import load_masks, save_delta, save_masks
from piece_mm.importance import estimate_importance
from piece_mm.methods import METHODS, load_tensors, register, save_tensors
from piece_mm.select import budget_arg, jaccard, mask_summary, select_masks
from piece_mm.sparse import sparse_optimizer
from piece_mm.tasks.base import METRICS
from piece_mm.tasks.errors import InputError
from piece_mm.tasks.sequence import GENERATION_DEFAULTS, Sequence

PER_SAMPLE_CHUNK = 16  # samples per batched pass when the budget scores per sample (score_batch_size: 1)


def _sparse_method(estimator: str):
    def make(model, processor, task, cfg, masks=None):
        """Score the task's training examples on the current model, pick the top weights per component within the
        budget, and return a sparse Adam over just those (recreated per task, as in PIECE)."""
        b = cfg["budget"]
        parts = split_components(model, exclude=b["exclude"], rules=b["components"])
        if masks is None:
            masks = _choose(model, processor, task, cfg, parts)
        opt = sparse_optimizer(model, masks, torch.optim.AdamW, lr=cfg["lr"], betas=tuple(b["betas"]),
                               weight_decay=b["weight_decay"])
        opt.parts = parts
        return opt

    def _choose(model, processor, task, cfg, parts):
        b = cfg["budget"]
        examples = task.train[: b["score_examples"]]
        per_sample = b["score_batch_size"] == 1  # exact per-sample scores from batched passes, not a batch-1 loop
        bs = PER_SAMPLE_CHUNK if per_sample else b["score_batch_size"]
        chunks = [examples[i:i + bs] for i in range(0, len(examples), bs)]
        if shard.is_fsdp(model):  # every scoring batch, this rank's share of its examples (FSDP2 sums the shares)
            batches = (_share_batch(processor, c) for c in chunks)
        else:
            batches = (collate(processor, c) for c in dist.share(chunks))  # this process's whole batches
        options = {"seed": cfg["seed"], "per_sample": per_sample, "accumulate": b.get("score_memory", "auto"),
                   "log": cfg.get("log")}
        if estimator == "trace":  # the probe's length follows the task's: a tenth of its steps unless set
            t = b["trace"]
            options = {"probe_steps": t["probe_steps"] or max(1, cfg["steps"] // 10), "probe_lr": t["probe_lr"],
                       "level": t["level"], "mix": t["mix"], "specificity_rule": t["specificity"],
                       "strength": t["strength"], "threshold": t["threshold"],
                       "history": cfg.get("trace_history", []), "probe_out": cfg.get("trace_out")}
        if estimator in GRADIENT_SCORES and b["pool"] == "component":
            # a component with no budget is not scored: on a 7B model that spares its fp32 sums (the vision tower's
            # are ~1.2 GB), and the other components' gradients, hence scores, are the same without it
            parts = {c: names if b["fractions"].get(c, 0) > 0 else [] for c, names in parts.items()}
        with activation_checkpointing(model, cfg.get("gradient_checkpointing", False)):
            scores = estimate_importance(model, batches, estimator, names=[n for c in parts.values() for n in c],
                                         **options)
        shards = dict(model.named_parameters()) if shard.is_fsdp(model) else None
        return select_masks(scores, parts, budget_arg(b), pool=b["pool"], granularity=b["granularity"],
                            shards=shards)
    make.__name__ = estimator
    return make


def _share_batch(processor, examples: list) -> dict:
    """This rank's share of one scoring batch. A rank left without an example (a batch smaller than the process
    count) runs the first one with no answer token counted, so it joins FSDP2's collectives and adds nothing."""
    mine = examples[dist.rank()::dist.world()]
    batch = collate(processor, mine or examples[:1])
    if not mine:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


SPARSE_METHODS = ("piece-f", "piece-s", "grad-magnitude", "magnitude", "random", "trace")
GRADIENT_SCORES = ("piece-f", "piece-s", "grad-magnitude")  # one gradient pass, element by element
SHARDED_METHODS = GRADIENT_SCORES + ("magnitude",)  # what runs on FSDP2 shards (piece_mm/shard.py)
for _name in SPARSE_METHODS:
    register(_name)(_sparse_method(_name))


def component_counts(model, rules: dict | None = None) -> dict:
    """Trainable elements per component (token embeddings counted with the LLM)."""
    parts = split_components(model, exclude=(), rules=rules)
    params = dict(model.named_parameters())
    counts = {c: sum(params[n].numel() for n in names if params[n].requires_grad) for c, names in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def evaluate(model, processor, seq: Sequence, eval_limit: int | None, batch_size: int, desc: str, clip=None,
             spice=None, task_answers=frozenset()):
    """(task scores in sequence order, each by its task's metric; general metrics (CLIPScore with a `clip`
    scorer, SPICE with a CoreNLP dir `spice`, the leak of `task_answers` into the captions); the first captions
    with their references)."""
    from piece_mm.eval.captioning import answer_leak, general_scores
    from piece_mm.eval.generate import generate

    tests = [t.test[:eval_limit] for t in seq.tasks]
    caps, vqa = seq.captions[:eval_limit], seq.vqa[:eval_limit]
    gen = getattr(seq, "generation", None) or GENERATION_DEFAULTS  # a sequence-like object may lack it
    with tqdm(total=sum(map(len, tests)) + len(caps) + len(vqa), desc=desc, file=sys.stderr, leave=False,
              mininterval=2, disable=None) as bar:  # None: no bar when stderr is not a terminal (logs, pipes)
        scores = []
        for task, examples in zip(seq.tasks, tests):
            answers = generate(model, processor, examples, batch_size=batch_size,
                               max_new_tokens=gen["answer_max_new_tokens"], progress=bar)
            score = METRICS[task.metric]
            scores.append(sum(score(a, ex) for a, ex in zip(answers, examples)) / len(examples))
        general, preds = general_scores(model, processor, caps, vqa, batch_size=batch_size, progress=bar,
                                        clip=clip, spice=spice, caption_max_new_tokens=gen["caption_max_new_tokens"],
                                        answer_max_new_tokens=gen["answer_max_new_tokens"])
    general.update(answer_leak(preds, [ex.refs or (ex.answer,) for ex in caps], task_answers))
    samples = [(p, ex.refs[0]) for p, ex in zip(preds[:3], caps)]
    return scores, general, samples


def make_scheduler(opt, steps: int):
    """Cosine schedule with 10 % warmup."""
    from transformers import get_cosine_schedule_with_warmup
    return get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)


def _fit_length(processor, seq: Sequence, max_length: int, log) -> Sequence:
    """The sequence with each task's training examples that do not fit in max_length tokens left out (counted in the
    log; never cut, which would train on a partial answer). A task with none left is bad input."""
    import dataclasses

    from piece_mm.batching import fit_length
    tasks = []
    for t in seq.tasks:
        kept, dropped = fit_length(processor, t.train, max_length)
        if not kept:
            raise InputError(f"--max-length {max_length}: every training example of task {t.name!r} is longer; "
                             "raise it")
        if dropped:
            log(f"{t.name}: {dropped} of {len(t.train)} training examples are longer than --max-length {max_length} "
                "tokens and are left out (cutting them would cut their answers)")
        tasks.append(dataclasses.replace(t, train=kept))
    return dataclasses.replace(seq, tasks=tasks)


def _sum_gradients(opt) -> None:
    """Sum the gradients the optimizer follows over the processes (for the sparse optimizer: only its compact ones).
    On FSDP2 shards they are summed already: FSDP2's reduce-scatter did it in backward."""
    if getattr(opt, "sharded", False):
        return
    grads = []
    for p in (opt.compact_params() if hasattr(opt, "compact_params") else
              [q for g in opt.param_groups for q in g["params"]]):
        if p.grad is None:  # every process must send the same buffer
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    dist.sum_(grads)


def _accumulate(model, micro_batches: list[dict], device, extra, world: int) -> torch.Tensor:
    """Forward and backward over the micro-batches of one step, each loss summed over its answer tokens and divided
    by the step's token count (over every process), so the gradients add up to those of the whole batch. Returns
    the step's loss (this process's share)."""
    micro_batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro_batches]
    count = global_answer_tokens(micro_batches)
    total = torch.zeros((), device=device)
    for b in micro_batches:
        out = model(**b, num_items_in_batch=count.to(device))
        loss = out.loss
        if extra is not None:  # a per-step regulariser: its share on each micro-batch and process
            loss = loss + extra(model, b, out) / (len(micro_batches) * world)
        loss.backward()
        total = total + loss.detach()
    return total


@contextlib.contextmanager
def activation_checkpointing(model, on: bool):
    """transformers' gradient checkpointing (non-reentrant, so only the tuned weights need gradients) while inside,
    with the KV cache off (checkpointing refuses one); generation gets both back afterwards. Scoring inside it
    checkpoints too (estimate_importance)."""
    if not on:
        yield
        return
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    use_cache = [getattr(c, "use_cache", None) for c in configs]
    for c in configs:
        c.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        for c, u in zip(configs, use_cache):
            c.use_cache = u


def train_task(model, processor, task, opt, sched, steps: int, batch_size: int, seed: int, desc: str,
               start: int = 0, on_step=None, grad_accum: int = 1, gradient_checkpointing: bool = False) -> float:
    """Optimizer steps `start`..`steps` on the task; on_step(step done, last loss) after each. Returns the last loss.
    grad_accum > 1 splits each step's batch into that many micro-batches (same examples, same gradient up to
    rounding); gradient_checkpointing recomputes activations in backward instead of keeping them."""
    device = next(model.parameters()).device
    model.train()
    world = dist.world()
    examples = getattr(opt, "train_examples", None) or task.train  # a method may train on more than the task's data
    bar = tqdm(training_batches(processor, examples, batch_size, steps, seed, start=start, rank=dist.rank(),
                                world=world, micro=grad_accum), initial=start, total=steps, desc=desc,
               file=sys.stderr, leave=False, mininterval=2, disable=None if dist.is_main() else True)  # terminal only
    with activation_checkpointing(model, gradient_checkpointing):
        loss_value = _train_steps(model, opt, sched, bar, start, device, world, on_step)
    model.eval()
    return loss_value


def _train_steps(model, opt, sched, bar, start, device, world, on_step) -> float:
    loss_value = float("nan")
    for step, batch in enumerate(bar, start=start):
        extra = getattr(opt, "extra_loss", None)  # a regulariser of the method (EWC's pull)
        if isinstance(batch, list):  # gradient accumulation
            loss = _accumulate(model, batch, device, extra, world)
            if world > 1:
                _sum_gradients(opt)
                loss = loss.reshape(1)
                dist.sum_([loss])
        elif world == 1:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = model(**batch)
            loss = out.loss
            if extra is not None:
                loss = loss + extra(model, batch, out)
            loss.backward()
        else:  # each process: its tokens' loss summed, over the global token count; gradients summed below
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            count = global_answer_tokens([batch])
            out = model(**batch, num_items_in_batch=count.to(device))
            loss = out.loss
            if extra is not None:  # the gradients are summed over the processes: each adds its share
                loss = loss + extra(model, batch, out) / world
            loss.backward()
            _sum_gradients(opt)
            loss = loss.detach().reshape(1)
            dist.sum_([loss])
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
        if on_step is not None:
            on_step(step + 1, loss_value)
    return loss_value


def run(model, processor, seq: Sequence, *, model_name: str, method: str, output: Path, seed: int, steps: int,
        batch_size: int, lr: float, eval_limit: int | None, budget: dict | None = None, eval_batch_size: int = 64,
        log=print, checkpoint_every: int = 50, resume_from: tuple | None = None, clip=None, spice=True,
        retention_threshold: float = 0.90, grad_accum: int = 1, max_length: int | None = None,
        gradient_checkpointing: bool = False) -> dict:
    """The continual run. Checkpoints (piece_mm/checkpoint.py) are written after the first evaluation, every
    `checkpoint_every` steps of a task (0: never mid-task), when a task's training ends and after its evaluation.
    resume_from = checkpoint.load(output) continues from that checkpoint, with the same result as a run that was
    never stopped (the caller checks it with check_resume first).

    `clip` (eval/clipscore.py) adds CLIPScore / RefCLIPScore to the general metrics; `spice` (True, or a CoreNLP
    dir) adds SPICE where its jars are found (else one warning line).

    Under several processes (piece_mm/dist.py) all of them train; the first one alone evaluates and writes, and
    returns the metrics (the others return None)."""
    from piece_mm.eval.cl_metrics import summary
    from piece_mm.eval.report import write_report

    if method not in METHODS:
        raise KeyError(method)
    t0 = time.time()
    if max_length:
        seq = _fit_length(processor, seq, max_length, log if dist.is_main() else (lambda _: None))
    names = [t.name for t in seq.tasks]
    config = run_config(model_name, method, seed, steps, batch_size, lr, eval_limit, names, budget,
                        clip.name if clip is not None else None, dtype=str(next(model.parameters()).dtype),
                        generation=seq.generation)
    if grad_accum > 1 or max_length:  # they change the numbers (rounding, the examples trained on): resume keeps them
        config.update(grad_accum=grad_accum, max_length=max_length)
    main = dist.is_main()
    sharded = shard.is_fsdp(model)  # FSDP2: collectives in every forward and checkpoint, so every rank joins them
    if sharded and not main:  # the others generate alongside the first; only its metrics are kept
        clip, spice = None, False
    # every task's answers, learned yet or not, so that each stage (row 0 too) counts leaks against the same words
    task_answers = frozenset(ex.answer for t in seq.tasks for ex in t.train)
    cfg = {"lr": lr, "seed": seed, "steps": steps, "batch_size": batch_size, "budget": budget, "tasks": seq.tasks,
           "output": Path(output), "main": main, "log": log if main else None,
           "gradient_checkpointing": gradient_checkpointing}
    parameters = sum(p.numel() for p in model.parameters())  # the model's own, before any adapter
    if hasattr(METHODS[method], "prepare"):  # adapters: the checkpoints hold the adapted model
        METHODS[method].prepare(model)
    train_state = None
    if resume_from is not None:
        st, where = resume_from
        check_resume(st, config, output)
        train_state = checkpoint.restore(where, model)
        log(f"resuming from {where}: task {st['task'] + 1}, step {st['step']}" if st["in_task"] else
            f"resuming from {where}: before task {st['task'] + 1}")
    else:
        st = {"config": config, "task": 0, "step": 0, "in_task": False, "R": [], "before": None,
              "after": [], "samples": [], "selection": [], "loss": None, "time_s": 0.0, "optimizer_bytes": [],
              "trainable": {"vision": 0, "projector": 0, "llm": 0, "total": 0}}
        if main or sharded:  # on shards every rank takes part in each forward, so all of them evaluate
            with shard.whole_root(model):
                scores, general, samples = evaluate(model, processor, seq, eval_limit, eval_batch_size,
                                                    "eval before", clip, spice, task_answers)
            log(f"before: scores {_fmt(scores)}  {_general(general)}")
            if main and general.get("CIDEr", 1.0) < 0.1:
                print(f"warning: the base model's held-out CIDEr is {general['CIDEr']:.3f} (< 0.1): it cannot caption "
                      "this set, so caption retention says nothing about what tuning keeps", file=sys.stderr)
            st.update(R=[scores], before=general, samples=[samples])
            checkpoint.save(output, {**st, "time_s": time.time() - t0}, model)
        dist.barrier()
    elapsed = st["time_s"] - t0  # + time.time() = the run's time, over every process that worked on it

    # TRACE: each task's update signature, for the specificity of later tasks (saved, so a resumed run has them)
    trace_files = [output / "trace" / f"{i + 1}-{t.name}.safetensors" for i, t in enumerate(seq.tasks)]
    history = [load_tensors(f) for f in trace_files[:st["task"] + (1 if st["in_task"] else 0)]] \
        if method == "trace" else []
    for i in range(st["task"], len(seq.tasks)):
        task = seq.tasks[i]
        mask_file = output / "masks" / f"{i + 1}-{task.name}.safetensors"
        if st["in_task"]:  # resumed inside this task: same masks, optimizer, schedule, RNG and data position
            masks = load_masks(mask_file) if method in SPARSE_METHODS else None
            opt = METHODS[method](model, processor, task, cfg | {"seed": seed * 1000 + i, "index": i,
                                                                 "resumed": True}, masks=masks)
            sched = make_scheduler(opt, steps)
            if train_state["optimizer"] is not None:
                opt.load_state_dict(train_state["optimizer"])
                sched.load_state_dict(train_state["scheduler"])
            checkpoint.set_rng_state(train_state["rng"])
            start = st["step"]
        else:
            torch.manual_seed(seed * 1000 + i)
            probe_out: dict = {}
            opt = METHODS[method](model, processor, task, cfg | {"seed": seed * 1000 + i, "index": i,
                                                                 "resumed": False, "trace_history": history,
                                                                 "trace_out": probe_out})
            if "sketch" in probe_out:
                history.append(probe_out["sketch"])
                if main:
                    save_tensors(probe_out["sketch"], trace_files[i])
            sched = make_scheduler(opt, steps)
            start = 0
            masks = getattr(opt, "masks", None)
            if masks is not None:
                summ = mask_summary(masks, opt.parts)
                counts = {c: summ[c]["chosen"] for c in opt.parts} | {"total": summ["total"]}
                st["selection"].append({"task": task.name, **summ})
                if main:
                    save_masks(masks, mask_file, {"task": task.name})
                log(f"{task.name}: tuning {summ['total']:,} weights (" +
                    ", ".join(f"{c} {summ[c]['chosen']:,}" for c in opt.parts) + ")")
            else:
                counts = component_counts(model, (budget or {}).get("components"))
            st["trainable"] = {k: max(st["trainable"][k], counts[k]) for k in counts}
            st.update(task=i, step=0, in_task=True)

        def on_step(done, loss, opt=opt, sched=sched):
            if (main or sharded) and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
                st.update(step=done, loss=loss, time_s=elapsed + time.time())
                checkpoint.save(output, st, model, opt, sched)

        if start < steps:
            st["loss"] = train_task(model, processor, task, opt, sched, steps, batch_size, seed * 1000 + i,
                                    desc=f"task {i + 1}/{len(seq.tasks)} {task.name}", start=start, on_step=on_step,
                                    grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing)
        if hasattr(opt, "state_bytes") and start < steps:  # what each process held for the chosen elements
            held = dist.gather_all(torch.tensor([opt.state_bytes()], dtype=torch.int64))
            st["optimizer_bytes"] = [max(a, int(b)) for a, b in
                                     zip(st.get("optimizer_bytes") or [0] * len(held), held.view(-1))]
        if hasattr(opt, "close"):
            opt.close()  # the sparse optimizer's gradient hooks would hide the next task's scoring gradients
        if hasattr(opt, "after_task"):  # e.g. EWC: this task's Fisher, measured by every process, saved by the first
            opt.after_task(model)
        masks = getattr(opt, "masks", None)
        st.update(task=i + 1, step=0, in_task=False)
        if main or sharded:
            if masks is not None:
                values = shard.gather_values(model, masks)  # on shards each rank sends the values it holds
                if main:
                    save_delta(model, masks, output / "deltas" / f"{i + 1}-{task.name}.safetensors",
                               {"task": task.name}, values=values)
            with shard.whole_root(model):
                scores, general, samples = evaluate(model, processor, seq, eval_limit, eval_batch_size,
                                                    f"eval {task.name}", clip, spice, task_answers)
            st["R"].append(scores)
            st["after"].append(general)
            st["samples"].append(samples)
            log(f"after {task.name}: loss {st['loss']:.3f}  scores {_fmt(scores)}  {_general(general)}")
            st["time_s"] = elapsed + time.time()
            # the checkpoint of training's last step holds these very weights: link them, do not write them again
            checkpoint.save(output, st, model, weights_unchanged=True)
        dist.barrier()  # the others wait while the first process evaluates

    if not main:
        return None
    R = st["R"]
    metrics = {"model": model_name, "method": method, "seed": seed, "tasks": names,
               "task_metrics": [t.metric for t in seq.tasks], "scores": R,
               "general": {"before": st["before"], "after": st["after"]},
               "summary": summary(R, st["before"], st["after"]), "trainable": st["trainable"],
               "time_s": elapsed + time.time(), "parameters": parameters,
               "peak_memory_mb": _peak_rss_mb(), "retention_threshold": retention_threshold}
    if st.get("optimizer_bytes"):  # per process, the most any task needed (sparse methods)
        metrics["optimizer_state_bytes"] = {"per_process": st["optimizer_bytes"], "processes": dist.world(),
                                            "sharded": sharded}
    if st["selection"]:
        all_masks = [load_masks(output / "masks" / f"{i + 1}-{t}.safetensors") for i, t in enumerate(names)]
        metrics["budget"] = budget["path"]
        metrics["selection"] = st["selection"]
        metrics["mask_jaccard"] = [[jaccard(a, b) for b in all_masks] for a in all_masks]
    if method == "trace":
        from piece_mm.trace import cosine_matrix
        metrics["trace_cosine"] = cosine_matrix([load_tensors(f) for f in trace_files])
    _atomic_write(output / "metrics.json", json.dumps(metrics, indent=1))
    write_report(output, metrics, st["samples"])
    checkpoint.remove(output)  # the run is finished: metrics.json says so, and checkpoints are model-sized
    if hasattr(METHODS[method], "finish"):  # adapters merged into the weights: the final model is a plain one
        METHODS[method].finish(model)
    return metrics


def run_config(model_name, method, seed, steps, batch_size, lr, eval_limit, task_names, budget, clip=None,
               dtype=None, generation=None) -> dict:
    """What a resumed run must share with the run it continues (as JSON would hold it). dtype (the weights', e.g.
    "torch.bfloat16") is checked once the model is loaded; None leaves it out of the comparison."""
    config = {"model": model_name, "method": method, "seed": seed, "steps": steps, "batch_size": batch_size,
              "lr": lr, "eval_limit": eval_limit, "tasks": task_names, "budget": budget, "clip": clip}
    if dtype is not None:
        config["dtype"] = dtype
    if generation is not None:
        config["generation"] = generation
    return json.loads(json.dumps(config))


def check_resume(state: dict, now: dict, output: Path) -> None:
    from piece_mm.budget import BUDGET_DEFAULTS
    saved = state["config"]
    if isinstance(saved.get("budget"), dict) and isinstance(now.get("budget"), dict):
        # a budget field added since the run started, at its default, is no change (e.g. score_memory)
        now = {**now, "budget": {k: v for k, v in now["budget"].items()
                                 if k in saved["budget"] or v != BUDGET_DEFAULTS.get(k, object())}}
    for key in now:
        if saved.get(key) != now[key]:
            raise InputError(f"--resume: {output} was started with {key} = {saved.get(key)!r}; this call has "
                             f"{now[key]!r}")


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (a resumed run: since it was resumed)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _general(g: dict) -> str:
    labels = {"CIDEr": "CIDEr", "CLIPScore": "CLIPScore", "VQA": "VQA", "answer_leak": "leak"}
    return "  ".join(f"{label} {g[k]:.3f}" for k, label in labels.items() if k in g)


def _fmt(xs) -> str:
    return "[" + " ".join(f"{x:.2f}" for x in xs) + "]"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
