"""The continual loop: for each task, build the method's optimizer, train, then evaluate every task and the general
held-out set. Methods are registered by name (piece_mm/methods/__init__.py describes one); the sparse ones are
registered here, the baselines in piece_mm/methods/."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from piece_mm import checkpoint, dist, shard
from piece_mm.batching import global_answer_tokens, model_inputs, training_batches
from piece_mm.components import split_components
from piece_mm.delta import load_masks, save_delta, save_masks
from piece_mm.errors import InputError
from piece_mm.methods import METHODS, Method, TaskContext, Tuning, load_settings
from piece_mm.models import activation_checkpointing
from piece_mm.select import jaccard, mask_summary
from piece_mm.tasks.base import METRICS
from piece_mm.tasks.sequence import GENERATION_DEFAULTS, Sequence


def component_counts(model, rules: dict | None = None) -> dict:
    """Trainable elements per component (token embeddings counted with the LLM)."""
    parts = split_components(model, exclude=(), rules=rules)
    params = dict(model.named_parameters())
    counts = {c: sum(params[n].numel() for n in names if params[n].requires_grad) for c, names in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def evaluate(model, processor, seq: Sequence, eval_limit: int | None, batch_size: int, desc: str, clip=None,
             spice=None, task_answers=frozenset(), general: bool = True):
    """(task scores in sequence order, each by its task's metric; general metrics (CLIPScore with a `clip`
    scorer, SPICE with a CoreNLP dir `spice`, the leak of `task_answers` into the captions); the first captions
    with their references). Without `general`: the task scores only ({} and [] for the rest)."""
    from piece_mm.eval.captioning import answer_leak, general_scores, prompt_scores
    from piece_mm.eval.generate import generate

    tests = [t.test[:eval_limit] for t in seq.tasks]
    caps, vqa = (seq.captions[:eval_limit], seq.vqa[:eval_limit]) if general else ([], [])
    gen = getattr(seq, "generation", None) or GENERATION_DEFAULTS  # a sequence-like object may lack it
    unseen = getattr(seq, "unseen_prompts", ()) if general else ()
    with tqdm(total=sum(map(len, tests)) + len(caps) * (1 + len(unseen)) + len(vqa), desc=desc, file=sys.stderr,
              leave=False,
              mininterval=2, disable=None) as bar:  # None: no bar when stderr is not a terminal (logs, pipes)
        scores = []
        for task, examples in zip(seq.tasks, tests):
            answers = generate(model, processor, examples, batch_size=batch_size,
                               max_new_tokens=gen["answer_max_new_tokens"], progress=bar)
            score = METRICS[task.metric]
            scores.append(sum(score(a, ex) for a, ex in zip(answers, examples)) / len(examples))
        if not general:
            return scores, {}, []
        general, preds = general_scores(model, processor, caps, vqa, batch_size=batch_size, progress=bar,
                                        clip=clip, spice=spice, caption_max_new_tokens=gen["caption_max_new_tokens"],
                                        answer_max_new_tokens=gen["answer_max_new_tokens"],
                                        vqa_unseen=getattr(seq, "vqa_unseen", ())[:len(vqa)])
        if unseen:  # the same images under the prompts no method is given
            general["unseen_prompts"] = prompt_scores(model, processor, caps, unseen, task_answers, batch_size, bar,
                                                      gen["caption_max_new_tokens"])
    general.update(answer_leak(preds, [ex.refs or (ex.answer,) for ex in caps], task_answers))
    samples = [(p, ex.refs[0]) for p, ex in zip(preds[:3], caps)]
    return scores, general, samples


WARMUP = 0.1  # the share of a task's steps the cosine schedule warms up over, unless the sequence's train.warmup says


def make_scheduler(opt, steps: int, warmup: float = WARMUP):
    """Cosine schedule with `warmup` of the steps warming up (10 %: at least one step; 0: none, as the PIECE
    authors' recipe)."""
    from transformers import get_cosine_schedule_with_warmup
    return get_cosine_schedule_with_warmup(opt, max(1, int(steps * warmup)) if warmup > 0 else 0, steps)


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
    """Sum the gradients the optimizer follows over the processes: its `grad_params()` where it has them (the sparse
    optimizer's compact ones, none on FSDP2 shards, whose reduce-scatter summed them in backward; the fp32 masters'
    model weights), else every parameter it steps."""
    if hasattr(opt, "grad_params"):
        params = opt.grad_params()
    else:
        params = [q for g in opt.param_groups for q in g["params"]]
    grads = []
    for p in params:
        if p.grad is None:  # every process must send the same buffer
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    dist.sum_(grads)


def _step(model, micro_batches: list[dict], device, regulariser) -> torch.Tensor:
    """Forward, regulariser, backward, once per micro-batch of one step: each task loss summed over its answer
    tokens and divided by the step's count of them (over every process), and each part of the regulariser's sum
    divided by that part's count over the whole step, so the gradients add up to those of the whole batch on one
    process. Returns the step's loss (this process's share)."""
    micro_batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro_batches]
    count = global_answer_tokens(micro_batches).to(device)  # a collective: every process calls it
    if regulariser is not None:  # known before any forward: what each part is averaged over
        counts = torch.stack([regulariser.counts(b).to(device).float() for b in micro_batches]).sum(0)
        dist.sum_([counts])
        counts = counts.clamp_min(1.0)
    total = torch.zeros((), device=device)
    for b in micro_batches:
        out = model(**model_inputs(b), num_items_in_batch=count)
        loss = out.loss
        if regulariser is not None:
            loss = loss + (regulariser(model, b, out) / counts).sum()
        loss.backward()
        total = total + loss.detach()
    return total


def train_task(model, processor, task, opt, sched, steps: int, batch_size: int, seed: int, desc: str,
               start: int = 0, on_step=None, grad_accum: int = 1, gradient_checkpointing: bool = False,
               examples: list | None = None, regulariser=None, held: list | None = None,
               held_per_step: int = 0) -> float:
    """Optimizer steps `start`..`steps` on the task; on_step(step done, last loss) after each. Returns the last loss.
    grad_accum > 1 splits each step's batch into that many micro-batches (same examples, same gradient up to
    rounding); gradient_checkpointing recomputes activations in backward instead of keeping them. A method may
    train on other `examples` than the task's and add a `regulariser` (regularise.py: its parts' sums, each divided
    by its count over the step). `held` examples join each step's batch, `held_per_step` of them, as rows that the
    regulariser holds and the task loss does not learn (batching.training_batches)."""
    device = next(model.parameters()).device
    model.train()
    world = dist.world()
    examples = examples or task.train
    bar = tqdm(training_batches(processor, examples, batch_size, steps, seed, start=start, rank=dist.rank(),
                                world=world, micro=grad_accum, held=held or (), held_size=held_per_step),
               initial=start, total=steps, desc=desc,
               file=sys.stderr, leave=False, mininterval=2, disable=None if dist.is_main() else True)  # terminal only
    # the sparse optimizer clips by the norm of the gradient it follows; others by the trainable weights'
    clip = getattr(opt, "clip_grad_norm_", None) or (lambda norm: torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], norm))
    loss_value = float("nan")
    with activation_checkpointing(model, gradient_checkpointing):
        for step, batch in enumerate(bar, start=start):
            loss = _step(model, batch if isinstance(batch, list) else [batch], device, regulariser)
            if world > 1:
                _sum_gradients(opt)
                loss = loss.reshape(1)
                dist.sum_([loss])
            clip(1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_step is not None:
                on_step(step + 1, loss_value)
    model.eval()
    return loss_value


@dataclass
class RunState:
    """Where a run is: what its checkpoints' state.json holds, and what metrics.json is made of at the end."""
    config: dict
    task: int = 0  # the task being trained (in_task) or the next one to train
    step: int = 0
    in_task: bool = False
    R: list = field(default_factory=list)  # R[0]: before any task; R[i]: every task's score after task i
    before: dict | None = None  # general metrics before any task
    after: list = field(default_factory=list)  # general metrics after each task
    samples: list = field(default_factory=list)
    selection: list = field(default_factory=list)  # sparse methods: what each task chose
    loss: float | None = None
    time_s: float = 0.0
    optimizer_bytes: list = field(default_factory=list)  # per process, the most any task held
    trainable: dict = field(default_factory=lambda: {"vision": 0, "projector": 0, "llm": 0, "total": 0})

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def run(model, processor, seq: Sequence, *, model_name: str, method: str, output: Path, seed: int,
        steps: int | list[int],
        batch_size: int, lr: float, eval_limit: int | None, budget: dict | None = None, eval_batch_size: int = 64,
        log=print, checkpoint_every: int = 50, resume_from: tuple | None = None, clip=None, spice=True,
        retention_threshold: float = 0.90, grad_accum: int = 1, max_length: int | None = None,
        gradient_checkpointing: bool = False, settings: dict | None = None, warmup: float = WARMUP,
        frozen: list[str] | tuple = (), eval_general: str = "every") -> dict:
    """The continual run. `steps` per task: one number for every task, or one per task (derived from epochs).
    Checkpoints (piece_mm/checkpoint.py) are written after the first evaluation, every
    `checkpoint_every` steps of a task (0: never mid-task), when a task's training ends and after its evaluation.
    resume_from = checkpoint.load(output) continues from that checkpoint, with the same result as a run that was
    never stopped (the caller checks it with check_resume first).

    `clip` (eval/clipscore.py) adds CLIPScore / RefCLIPScore to the general metrics; `spice` (True, or a CoreNLP
    dir) adds SPICE where its jars are found (else one warning line). `settings` are the method's constants
    (methods.load_settings; default: its configs/methods/<name>.yaml). `frozen`: regexes (re.search) of the weights a
    dense or LoRA method leaves frozen (--exclude), its adapters' included. `eval_general` "last": the general set is
    scored before the first task and after the last only (a stage between has {} there); retention reads only those.

    Under several processes (piece_mm/dist.py) all of them train; the first one alone evaluates and writes, and
    returns the metrics (the others return None)."""
    from piece_mm.eval.report import write_report

    t0 = time.time()
    m = METHODS[method]
    settings = load_settings(method) if settings is None else settings
    if max_length:
        seq = _fit_length(processor, seq, max_length, log if dist.is_main() else (lambda _: None))
    config = run_config(model_name, method, seed, steps, batch_size, lr, eval_limit, [t.name for t in seq.tasks],
                        budget, clip.name if clip is not None else None, dtype=str(next(model.parameters()).dtype),
                        generation=seq.generation, warmup=warmup)
    if settings:  # a method's constants change its numbers: a resumed run keeps them
        config["settings"] = settings
    if frozen:
        config["frozen"] = list(frozen)
    if grad_accum > 1 or max_length:  # they change the numbers (rounding, the examples trained on): resume keeps them
        config.update(grad_accum=grad_accum, max_length=max_length)
    about = {"method": method, "model": model_name, "model_config_sha256": _config_hash(model),
             "budget": budget["path"] if budget else ""}  # written into every delta (its "piece_mm" metadata)
    loop = _Loop(model, processor, seq, m, Path(output), about=about, log=log, seed=seed, steps=steps,
                 batch_size=batch_size,
                 lr=lr, budget=budget, eval_limit=eval_limit, eval_batch_size=eval_batch_size, clip=clip,
                 spice=spice, checkpoint_every=checkpoint_every, grad_accum=grad_accum,
                 gradient_checkpointing=gradient_checkpointing, settings=settings, warmup=warmup,
                 eval_general=eval_general)
    parameters = sum(p.numel() for p in model.parameters())  # the model's own, before any adapter
    if m.prepare is not None:  # adapters: the checkpoints hold the adapted model
        m.prepare(model, settings)
    if frozen:
        freeze(model, frozen, log)
    st = loop.begin(config, resume_from, t0)
    for i in range(st.task, len(seq.tasks)):
        loop.tune(st, i)
    if not loop.main:
        return None
    metrics = loop.metrics(st, model_name, parameters, retention_threshold)
    _atomic_write(output / "metrics.json", json.dumps(metrics, indent=1))
    write_report(output, metrics, st.samples)
    checkpoint.remove(output)  # the run is finished: metrics.json says so, and checkpoints are model-sized
    if m.finish is not None:  # adapters merged into the weights: the final model is a plain one
        m.finish(model, settings)
    return metrics


def freeze(model, patterns, log=print) -> int:
    """Leave every trainable weight whose name matches one of `patterns` (re.search) frozen; the number frozen."""
    import re
    hit = [(n, p) for n, p in model.named_parameters() if p.requires_grad and any(re.search(x, n) for x in patterns)]
    for _, p in hit:
        p.requires_grad_(False)
    if log is not None and dist.is_main():
        log(f"--exclude: {sum(p.numel() for _, p in hit):,} weights in {len(hit)} tensors left frozen")
    return len(hit)


class _Loop:
    """The parts of a run that do not change (the model, the sequence, the method, how to evaluate and checkpoint),
    and the three stages that move its RunState: begin, tune one task, metrics."""

    def __init__(self, model, processor, seq: Sequence, method: Method, output: Path, *, about, log, seed, steps,
                 batch_size, lr, budget, eval_limit, eval_batch_size, clip, spice, checkpoint_every, grad_accum,
                 gradient_checkpointing, settings, warmup=WARMUP, eval_general="every"):
        self.warmup, self.eval_general = warmup, eval_general
        self.model, self.processor, self.seq, self.method, self.output = model, processor, seq, method, output
        self.log, self.seed, self.steps, self.batch_size, self.budget = log, seed, steps, batch_size, budget
        self.eval_limit, self.eval_batch_size, self.checkpoint_every = eval_limit, eval_batch_size, checkpoint_every
        self.grad_accum, self.gradient_checkpointing = grad_accum, gradient_checkpointing
        self.about = about
        self.main = dist.is_main()
        self.sharded = shard.is_fsdp(model)  # FSDP2: collectives in every forward and checkpoint: every rank joins
        # on shards the others generate alongside the first; only its metrics are kept
        self.clip, self.spice = (None, False) if self.sharded and not self.main else (clip, spice)
        # every task's answers, learned yet or not, so that each stage (row 0 too) counts leaks against the same words
        self.task_answers = frozenset(ex.answer for t in seq.tasks for ex in t.train)
        self.ctx = TaskContext(lr=lr, seed=seed, steps=0, batch_size=batch_size, tasks=list(seq.tasks), index=0,
                               output=output, budget=budget, settings=settings or {}, main=self.main,
                               log=log if self.main else None, gradient_checkpointing=gradient_checkpointing,
                               generate=self.generate)
        self.elapsed = 0.0  # + time.time() = the run's time, over every process that worked on it
        self.train_state = None

    def evaluate(self, desc: str, general: bool = True):
        with shard.whole_root(self.model):
            return evaluate(self.model, self.processor, self.seq, self.eval_limit, self.eval_batch_size, desc,
                            self.clip, self.spice, self.task_answers, general)

    def generate(self, model, processor, examples: list, max_new_tokens: int) -> list[str]:
        """Greedy replies, as evaluation makes them: what a method asks of the model as it stands (held prompts).
        Every process makes them (on shards each takes part in every forward)."""
        from piece_mm.eval.generate import generate
        with shard.whole_root(model):
            return generate(model, processor, examples, batch_size=self.eval_batch_size,
                            max_new_tokens=max_new_tokens)

    def save(self, st: RunState, opt=None, sched=None, weights_unchanged: bool = False) -> None:
        checkpoint.save(self.output, dataclasses.asdict(st), self.model, opt, sched,
                        weights_unchanged=weights_unchanged)

    def begin(self, config: dict, resume_from, t0: float) -> RunState:
        """The state to start from: a checkpoint's, or the base model's evaluation."""
        if resume_from is not None:
            saved, where = resume_from
            check_resume(saved, config, self.output)
            st = RunState.from_checkpoint(saved)
            self.train_state = checkpoint.restore(where, self.model)
            self.log(f"resuming from {where}: task {st.task + 1}, step {st.step}" if st.in_task else
                     f"resuming from {where}: before task {st.task + 1}")
        else:
            st = RunState(config)
            if self.main or self.sharded:  # on shards every rank takes part in each forward: all of them evaluate
                scores, general, samples = self.evaluate("eval before")
                self.log(f"before: scores {_fmt(scores)}  {_general(general)}")
                if self.main and general.get("CIDEr", 1.0) < 0.1:
                    print(f"warning: the base model's held-out CIDEr is {general['CIDEr']:.3f} (< 0.1): it cannot "
                          "caption this set, so caption retention says nothing about what tuning keeps",
                          file=sys.stderr)
                st.R, st.before, st.samples = [scores], general, [samples]
                st.time_s = time.time() - t0
                self.save(st)
            dist.barrier()
        self.elapsed = st.time_s - t0
        return st

    def steps_of(self, i: int) -> int:
        return self.steps[i] if isinstance(self.steps, (list, tuple)) else self.steps

    def tune(self, st: RunState, i: int) -> None:
        """Task i: build (or rebuild, resumed) what the method trains, train, evaluate, checkpoint."""
        task, steps, model = self.seq.tasks[i], self.steps_of(i), self.model
        mask_file = self.output / "masks" / f"{i + 1}-{task.name}.safetensors"
        ctx = dataclasses.replace(self.ctx, seed=self.seed * 1000 + i, index=i, resumed=st.in_task, steps=steps)
        if st.in_task:  # resumed inside this task: same masks, optimizer, schedule, RNG and data position
            tuning = self.method.for_task(model, self.processor, task, ctx,
                                          masks=load_masks(mask_file) if self.method.sparse else None)
            sched = make_scheduler(tuning.optimizer, steps, self.warmup)
            if self.train_state["optimizer"] is not None:
                tuning.optimizer.load_state_dict(self.train_state["optimizer"])
                sched.load_state_dict(self.train_state["scheduler"])
            checkpoint.set_rng_state(self.train_state["rng"])
            start = st.step
        else:
            torch.manual_seed(self.seed * 1000 + i)
            tuning = self.method.for_task(model, self.processor, task, ctx)
            sched = make_scheduler(tuning.optimizer, steps, self.warmup)
            start = 0
            self._chosen(st, task, tuning, mask_file)
            st.task, st.step, st.in_task = i, 0, True

        def on_step(done, loss):
            if (self.main or self.sharded) and (done == steps or (self.checkpoint_every and
                                                                  done % self.checkpoint_every == 0)):
                st.step, st.loss, st.time_s = done, loss, self.elapsed + time.time()
                self.save(st, tuning.optimizer, sched)

        if start < steps:
            st.loss = train_task(model, self.processor, task, tuning.optimizer, sched, steps, self.batch_size,
                                 self.seed * 1000 + i, desc=f"task {i + 1}/{len(self.seq.tasks)} {task.name}",
                                 start=start, on_step=on_step, grad_accum=self.grad_accum,
                                 gradient_checkpointing=self.gradient_checkpointing,
                                 examples=tuning.train_examples, regulariser=tuning.regulariser,
                                 held=tuning.held_examples, held_per_step=tuning.held_per_step)
            if self.method.sparse:  # what each process held for the chosen elements
                held = dist.gather_all(torch.tensor([tuning.optimizer.state_bytes()], dtype=torch.int64))
                st.optimizer_bytes = [max(a, int(b)) for a, b in
                                      zip(st.optimizer_bytes or [0] * len(held), held.view(-1))]
        if tuning.close is not None:
            tuning.close()  # the sparse optimizer's gradient hooks would hide the next task's scoring gradients
        if tuning.after_task is not None:  # e.g. EWC: this task's Fisher, measured by every process
            tuning.after_task(model)
        st.task, st.step, st.in_task = i + 1, 0, False
        if self.main or self.sharded:
            if tuning.masks is not None:
                values = shard.gather_values(model, tuning.masks)  # on shards each rank sends the values it holds
                if self.main:
                    save_delta(model, tuning.masks, self.output / "deltas" / f"{i + 1}-{task.name}.safetensors",
                               # one key: safetensors writes its metadata map in no fixed order, and a
                               # resumed run must write the very same bytes
                               {"piece_mm": json.dumps({"task": task.name, **self.about}, sort_keys=True)},
                               values=values)
            last = i + 1 == len(self.seq.tasks)
            scores, general, samples = self.evaluate(f"eval {task.name}", self.eval_general == "every" or last)
            st.R.append(scores)
            st.after.append(general)
            st.samples.append(samples)
            self.log(f"after {task.name}: loss {st.loss:.3f}  scores {_fmt(scores)}  {_general(general)}")
            st.time_s = self.elapsed + time.time()
            # the checkpoint of training's last step holds these very weights: link them, do not write them again
            self.save(st, weights_unchanged=True)
        dist.barrier()  # the others wait while the first process evaluates

    def _chosen(self, st: RunState, task, tuning: Tuning, mask_file: Path) -> None:
        """A new task's trainable weights: the masks saved and counted (sparse methods), or the method's count."""
        if tuning.masks is None:
            counts = component_counts(self.model, (self.budget or {}).get("components"))
        else:
            summ = mask_summary(tuning.masks, tuning.parts)
            counts = {c: summ[c]["chosen"] for c in tuning.parts} | {"total": summ["total"]}
            st.selection.append({"task": task.name, **summ})
            if self.main:
                save_masks(tuning.masks, mask_file, {"task": task.name})
            self.log(f"{task.name}: tuning {summ['total']:,} weights (" +
                     ", ".join(f"{c} {summ[c]['chosen']:,}" for c in tuning.parts) + ")")
        st.trainable = {k: max(st.trainable[k], counts[k]) for k in counts}

    def metrics(self, st: RunState, model_name: str, parameters: int, retention_threshold: float) -> dict:
        from piece_mm.eval.cl_metrics import summary

        names = [t.name for t in self.seq.tasks]
        metrics = {"model": model_name, "method": self.method.name, "seed": self.seed, "tasks": names,
                   "task_metrics": [t.metric for t in self.seq.tasks], "scores": st.R,
                   "general": {"before": st.before, "after": st.after},
                   "summary": summary(st.R, st.before, st.after, self.seq.lead_metrics), "trainable": st.trainable,
                   "time_s": self.elapsed + time.time(), "parameters": parameters,
                   "peak_memory_mb": _peak_rss_mb(), "retention_threshold": retention_threshold,
                   "versions": _versions()}
        if self.seq.lead_metrics:
            metrics["lead_metrics"] = list(self.seq.lead_metrics)
        if self.eval_general != "every":  # the stages between have no general scores ({})
            metrics["eval_general"] = self.eval_general
        if st.optimizer_bytes:  # per process, the most any task needed (sparse methods)
            metrics["optimizer_state_bytes"] = {"per_process": st.optimizer_bytes, "processes": dist.world(),
                                                "sharded": self.sharded}
        if st.selection:
            all_masks = [load_masks(self.output / "masks" / f"{i + 1}-{t}.safetensors") for i, t in enumerate(names)]
            metrics["budget"] = self.budget["path"]
            metrics["selection"] = st.selection
            metrics["mask_jaccard"] = [[jaccard(a, b) for b in all_masks] for a in all_masks]
        if self.method.metrics is not None:  # TRACE: the cosines of the tasks' update sketches
            metrics.update(self.method.metrics(self.ctx))
        return metrics


def run_config(model_name, method, seed, steps, batch_size, lr, eval_limit, task_names, budget, clip=None,
               dtype=None, generation=None, warmup=WARMUP) -> dict:
    """What a resumed run must share with the run it continues (as JSON would hold it). dtype (the weights', e.g.
    "torch.bfloat16") is checked once the model is loaded; None leaves it out of the comparison."""
    config = {"model": model_name, "method": method, "seed": seed, "steps": steps, "batch_size": batch_size,
              "lr": lr, "eval_limit": eval_limit, "tasks": task_names, "budget": budget, "clip": clip}
    if dtype is not None:
        config["dtype"] = dtype
    if warmup != WARMUP:  # a recipe's own schedule (older runs had none of this key)
        config["warmup"] = warmup
    if generation is not None:
        config["generation"] = generation
    return json.loads(json.dumps(config))


def check_resume(state: dict, now: dict, output: Path) -> None:
    from piece_mm.budget import BUDGET_DEFAULTS
    saved = state["config"]
    if isinstance(saved.get("budget"), dict) and isinstance(now.get("budget"), dict):
        # a budget field added since the run started, at its default, is no change (e.g. score_memory, or
        # distill.held.crops one level down)
        now = {**now, "budget": _without_new_defaults(now["budget"], saved["budget"], BUDGET_DEFAULTS)}
    saved, now = {**saved, "clip": _embedded(saved.get("clip"))}, {**now, "clip": _embedded(now.get("clip"))}
    for key in now:
        if key == "settings" and key not in saved:  # a run started before method settings were recorded
            continue
        if key == "frozen" and key not in saved and not now[key]:  # recorded only when --exclude is given
            continue
        if saved.get(key) != now[key]:
            raise InputError(f"--resume: {output} was started with {key} = {saved.get(key)!r}; this call has "
                             f"{now[key]!r}")


def _embedded(clip):
    """The embedded CLIP by its name, wherever piece_mm is installed (a run started from another checkout of the same
    package resumes); any other path as it is."""
    if isinstance(clip, str) and Path(clip).parent.parts[-2:] == ("piece_mm", "checkpoints"):
        return "piece_mm/checkpoints/" + Path(clip).name
    return clip


def _without_new_defaults(now: dict, saved: dict, defaults: dict) -> dict:
    """now without the fields saved lacks that hold their default, at any depth."""
    out = {}
    for k, v in now.items():
        default = defaults.get(k, object()) if isinstance(defaults, dict) else object()
        if k not in saved:
            if v != default:
                out[k] = v
        elif isinstance(v, dict) and isinstance(saved[k], dict):
            out[k] = _without_new_defaults(v, saved[k], default if isinstance(default, dict) else {})
        else:
            out[k] = v
    return out


def _config_hash(model) -> str:
    """sha256 of the model's whole config (config.json's content): which base a delta applies to."""
    import hashlib
    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()


def _versions() -> dict:
    """The library versions a run was made with: the same seed can score a little differently under another torch or
    transformers (kernels and defaults change), so a result names what made it."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in ("torch", "transformers", "peft", "piece_mm"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


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
