"""Regularisers: terms added to a task's loss, and `pm.Distillation`, the default method's.

A regulariser says, for one (micro-)batch, what each of its parts sums and over how many units that sum is averaged:

    counts(batch) -> [parts] float    known before the forward (positions, or 1 for a term per step)
    __call__(model, batch, out) -> [parts] float    the sums, weights included

The loop (continual._step) adds Σ_parts sum / (that part's count over the whole step: every micro-batch and every
process) to the task loss, once per forward, so a step's term is the same under gradient accumulation and data
parallelism as on one batch.

`Distillation` is LwF's term, weight · T² · KL(teacher ‖ student) of the next-token distributions at temperature T,
where the teacher is the model as the task begins. The teacher never changes within a task and the inputs it is asked
about (the task's training examples, and the held rows: methods/held.py) are known before the first step, so
`prepare` runs it once per example and keeps, per text position, its top-k log-probabilities with the rest of the
mass in one bucket. The term is then the KL of those k + 1 outcomes:

    KL = Σ_{i in top-k} p_i (log p_i − log q_i) + r (log r − log r_q),   r = 1 − Σ_top-k p_i,  r_q likewise for q

which is the exact KL when k is the vocabulary (r = 0). A step then costs no teacher forward and no teacher logits,
and the KL is computed a chunk of positions at a time, its gradient written straight into one tensor. The positions
of image placeholders are not held unless `image_positions` (they predict the next placeholder, which no prompt asks
for; on LLaVA-1.5 they are 576 of every row's tokens), but they are still counted in what the task's part is averaged
over, so each held position weighs what it weighs in the exact term (averaged over the mean over text positions only,
the tiny LLaVA's first task was learned less: 0.92 against 0.97, seed 0). The cache is written to a safetensors
file when given a path, so a resumed task reads it back instead of recomputing it.

    reg = pm.Distillation(weight=1.0, temperature=2.0, top_k=32)
    reg.prepare(model, processor, train_examples)         # the model as it is now is the teacher
    collate = reg.collator(processor)                     # batches that say which cached rows they hold
    ...  loss = out.loss + (reg(model, batch, out) / reg.counts(batch).clamp_min(1)).sum()

In a transformers.Trainer, `pm.PieceCallback(regulariser=reg)` adds the term to the model's loss (trainer.py)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_mm.batching import HELD, IGNORE_INDEX, ROWS, collate, model_inputs
from piece_mm.errors import InputError
from piece_mm.tasks.base import Example

CHUNK = 64  # positions whose fp32 distributions the term computes at once


def _chunk_kl(z, values, indices, rest):
    """(KL [n], lse [n], the bucket's r / r_q [n] or None) at T-scaled logits z [n, V]."""
    lse = z.logsumexp(-1)
    kl = (values.exp() * (values - z.gather(-1, indices) + lse[:, None])).sum(-1)
    ratio = None
    if indices.shape[-1] < z.shape[-1]:  # r (log r - log r_q), r_q the student's mass outside the top k
        log_rq = z.scatter(-1, indices, float("-inf")).logsumexp(-1) - lse
        finite = torch.isfinite(rest)
        kl = kl + torch.where(finite, rest.exp() * (rest - log_rq), torch.zeros_like(rest))
        ratio = torch.where(finite, (rest - log_rq).exp(), torch.zeros_like(rest))  # r / r_q
    return kl, lse, ratio


class _CachedKL(torch.autograd.Function):
    """T² Σ KL of the cached term over the rows `at` of logits [M, V] (a view of the model's logits: no copy), CHUNK
    rows at a time so that no fp32 copy of the whole [N, V] is made or kept; backward writes the gradient,
    T (q − p·[in top k] − (r / r_q) q·[outside]), chunk by chunk into one tensor of the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, at, values, indices, rest, temperature):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, len(at), CHUNK):
            z = logits[at[i:i + CHUNK]].float() / temperature
            total += _chunk_kl(z, values[i:i + CHUNK], indices[i:i + CHUNK], rest[i:i + CHUNK])[0].sum()
        ctx.save_for_backward(logits, at, values, indices, rest)
        ctx.temperature = temperature
        return total * temperature * temperature

    @staticmethod
    def backward(ctx, grad):
        logits, at, values, indices, rest = ctx.saved_tensors
        T = ctx.temperature
        out = torch.zeros_like(logits)
        for i in range(0, len(at), CHUNK):
            z = logits[at[i:i + CHUNK]].float() / T
            idx = indices[i:i + CHUNK]
            _, lse, ratio = _chunk_kl(z, values[i:i + CHUNK], idx, rest[i:i + CHUNK])
            g = (z - lse[:, None]).exp_()  # q
            if ratio is not None:  # outside the top k: q (1 - r / r_q); inside: q - p
                g.mul_(1 - ratio[:, None])
                g.scatter_(-1, idx, (z.gather(-1, idx) - lse[:, None]).exp())
            g.scatter_add_(-1, idx, -values[i:i + CHUNK].exp())
            out[at[i:i + CHUNK]] = g.mul_(grad * T).to(out.dtype)
        return out, None, None, None, None, None


class Regulariser:
    """A term added to the task loss (module docstring). The base is a term of one part counted once per batch."""

    def counts(self, batch: dict) -> torch.Tensor:
        return torch.ones(1)

    def __call__(self, model, batch: dict, out) -> torch.Tensor:
        raise NotImplementedError


class PerStep(Regulariser):
    """A term of the weights alone (EWC's pull, O-LoRA's orthogonality): `fn(model)` once per step. Each of the
    step's micro-batches and processes adds an equal share of it."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, model, batch: dict, out) -> torch.Tensor:
        return self.fn(model).reshape(1)


def kl_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T summed over the vocabulary and over the positions where `keep`
    ([B, L] bool) is set; the logits are [B, L, V] and the teacher's carry no gradient. The exact term (LwF's)."""
    s = student_logits[keep].float()
    t = teacher_logits[keep].float()
    T = temperature
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True,
                                    reduction="sum")
    return T * T * kl


def image_token_ids(model) -> tuple[int, ...]:
    """The ids of the placeholders a VLM expands into image (and video) features, from its config."""
    cfg = model.config
    ids = []
    for key in ("image_token_id", "image_token_index", "video_token_id"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return tuple(ids)


def allowed_tokens(processor, ex) -> list[list[int]]:
    """For a held example answered among `ex.choices`: at each position that predicts a token of its answer (its end
    included), the tokens some choice sharing the answer's tokens so far has there."""
    rows = [Example(ex.image, ex.prompt, c) for c in dict.fromkeys((ex.answer, *ex.choices))]
    labels = collate(processor, rows)["labels"]
    seqs = [lab[lab != IGNORE_INDEX].tolist() for lab in labels]
    answer, allowed = seqs[0], []
    for j in range(len(answer)):
        allowed.append(sorted({s[j] for s in seqs if len(s) > j and s[:j] == answer[:j]}))
    return allowed


def restrict(logits: torch.Tensor, allowed: list[list[int]]) -> torch.Tensor:
    """logits [P, V] with every token outside each position's allowed ones pushed out of reach (finite, so that the
    cached term's arithmetic stays finite)."""
    if len(allowed) != len(logits):
        raise ValueError(f"Distillation: a held row has {len(logits)} answer positions and {len(allowed)} allowed sets")
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for j, ids in enumerate(allowed):
        mask[j, ids] = True
    return logits.float().masked_fill(~mask, -1e9)


@dataclass
class TeacherCache:
    """The teacher's top-k log-probabilities (at temperature T) of every kept position of every prepared row: for row
    r, entries offsets[r]:offsets[r + 1] of values / indices [P, k] and rest [P] (the log of the mass outside the
    top k; -inf when k is the vocabulary)."""
    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    offsets: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.rest, self.offsets))

    def rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The entries of these rows, concatenated in order, and each row's number of positions."""
        starts, ends = self.offsets[ids], self.offsets[ids + 1]
        spans = [torch.arange(int(a), int(b)) for a, b in zip(starts, ends)]
        flat = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        return self.values[flat], self.indices[flat], self.rest[flat], [len(s) for s in spans]

    def save(self, path: Path, meta: dict) -> None:
        """Written atomically: a kill leaves the old file or the new one."""
        import os

        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # one metadata key: safetensors writes a metadata map in no fixed order, and the same cache must be the
        # same bytes (a resumed run's, an uninterrupted run's)
        save_file({"values": self.values, "indices": self.indices, "rest": self.rest, "offsets": self.offsets},
                  str(tmp), {"piece_mm": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, meta: dict) -> TeacherCache:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt") as f:
                saved = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("values", "indices", "rest", "offsets")}
        except (OSError, SafetensorError, KeyError) as e:
            raise InputError(f"{path}: the teacher's cache cannot be read ({str(e).splitlines()[0]})") from None
        try:
            saved = json.loads(saved.get("piece_mm", "{}"))
        except ValueError:
            saved = {}
        for k, v in meta.items():
            if saved.get(k) != v:
                raise InputError(f"{path}: a teacher cache made with {k} = {saved.get(k)!r}, not {v!r}")
        return cls(**tensors)


@dataclass(eq=False)
class Distillation(Regulariser):
    """weight · T² · KL(teacher ‖ student), the teacher being the model when `prepare` ran, from a cache of its top-k
    log-probabilities (module docstring).

    weight, temperature: the term on the task's own rows (every text position; without `answers`, not the positions
    that predict the task's answer); held_weight: the term on held rows (their answer predictions: batch["held"],
    methods/held.py), a part of its own, averaged over its own positions; top_k: log-probabilities kept per position
    (None: the whole vocabulary, the exact term); image_positions: also hold the image placeholders' positions."""
    weight: float = 1.0
    temperature: float = 2.0
    top_k: int | None = 32
    held_weight: float = 0.0
    answers: bool = True
    image_positions: bool = False
    held_options: dict | None = None  # how held_rows makes them (the budget's distill.held); None: given by hand
    cache: TeacherCache | None = field(default=None, repr=False)
    examples: list = field(default_factory=list, repr=False)  # what prepare cached: the training rows, then held
    held: list = field(default_factory=list, repr=False)
    _image_ids: tuple = field(default=(), repr=False)
    _allowed: dict = field(default_factory=dict, repr=False)  # held row -> its allowed tokens (allowed_tokens)

    @classmethod
    def from_budget(cls, budget) -> Distillation | None:
        """The budget's distill term (a pm.Budget, a budget dict, or a budget's name or path), or None when it has
        none (weight 0)."""
        from piece_mm.budget import Budget, distill_of
        if isinstance(budget, (str, Path)):
            budget = Budget.from_yaml(budget)
        if isinstance(budget, Budget):
            budget = budget.to_dict()
        d = distill_of(budget)
        if d is None:
            return None
        h = d.get("held") or {}
        return cls(weight=d["weight"], temperature=d["temperature"], top_k=d.get("top_k", 32),
                   held_weight=h.get("weight", 0.0), answers=d.get("answers", True),
                   image_positions=d.get("image_positions", False),
                   held_options=h if h.get("weight", 0.0) > 0 else None)

    def held_rows(self, model, processor, examples: list, generate, earlier_prompts=(), seed: int = 0,
                  log=None) -> list:
        """The held rows for a task (methods/held.py): `held_options["pool"]` of its examples' images asked the
        prompt bank's prompts and `earlier_prompts` (earlier tasks' prompts, strings), answered greedily by the model
        as it is now through `generate(model, processor, examples, max_new_tokens)` (e.g. piece_mm.eval.generate).
        `earlier_prompts` may also be {prompt: the answers its task was trained to give}: with the budget's
        distill.held.earlier_form those prompts are answered among them. Make the rows before the task trains, then
        give them to prepare."""
        if not self.held_options:
            raise InputError("Distillation.held_rows: this term has no held rows (a budget's distill.held weight > 0 "
                             "makes them)")
        from piece_mm.methods.held import FORM_MAX, make_held
        answers = None
        if isinstance(earlier_prompts, dict):
            answers = {p: tuple(a) for p, a in earlier_prompts.items() if a and len(a) <= FORM_MAX}
        return make_held(model, processor, examples, self.held_options, generate, list(earlier_prompts), seed,
                         log, answers)[0]

    # ---- the teacher, once per task ----

    def meta(self) -> dict:
        """What a saved cache must have been made with to be read back."""
        return {"temperature": self.temperature, "top_k": self.top_k, "answers": self.answers,
                "image_positions": self.image_positions, "rows": len(self.examples) + len(self.held)}

    @torch.no_grad()
    def prepare(self, model, processor, examples: list, held: list = (), *, batch_size: int = 16,
                path: Path | None = None, reuse: bool = False, log=None, base=None,
                at_base: list[int] = ()) -> Distillation:
        """Run the teacher (the model as it is now) once over `examples` and the `held` examples, and keep its
        top-k log-probabilities. With `path` the cache is written there (atomically); with `reuse` it is read back
        from there instead (a resumed task): the model is not run. `base`: a context manager factory under which the
        model is the base (methods/held.py, at_base); the held rows numbered in `at_base` are run inside it."""
        self.examples, self.held = list(examples), list(held)
        self._image_ids = image_token_ids(model)
        if reuse and path is not None:
            self.cache = TeacherCache.load(path, self.meta())
            return self
        self._allowed = {len(self.examples) + j: allowed_tokens(processor, ex) for j, ex in enumerate(self.held)
                         if ex.choices}
        from piece_mm import dist
        n = len(self.examples)
        spans = [(list(range(i, min(i + batch_size, n))), 0) for i in range(0, n, batch_size)]
        on_base = set(at_base) if base is not None else set()
        now = [n + j for j in range(len(self.held)) if j not in on_base]  # held rows: the model as it is now
        then = [n + j for j in sorted(on_base)]  # and the base
        spans += [(now[i:i + batch_size], len(now[i:i + batch_size])) for i in range(0, len(now), batch_size)]
        base_spans = [(then[i:i + batch_size], len(then[i:i + batch_size])) for i in range(0, len(then), batch_size)]

        def batches(spans):
            for rows, n_held in spans:
                batch = collate(processor, [self.examples[r] if r < n else self.held[r - n] for r in rows],
                                held=n_held)
                batch[ROWS] = torch.tensor(rows, dtype=torch.long)
                yield batch
        entries = self._entries(model, batches(spans))
        if base_spans:
            with base():
                entries.update(self._entries(model, batches(base_spans)))
        self.cache = self._assemble(entries, n + len(self.held))
        if path is not None and dist.is_main():
            self.cache.save(path, self.meta())
        if log:
            log(f"teacher cache: {len(self.cache.offsets) - 1:,} rows, {int(self.cache.offsets[-1]):,} positions, "
                f"top {self.cache.values.shape[-1]} log-probabilities each ({self.cache.nbytes() / 2**20:.1f} MB)")
        return self

    @torch.no_grad()
    def cache_batches(self, model, batches, rows: int) -> TeacherCache:
        """The teacher's cache over `batches` (each saying which rows it holds, batch["rows"], numbered 0..rows-1),
        the teacher being `model` as it is now, in eval mode."""
        return self._assemble(self._entries(model, batches), rows)

    @torch.no_grad()
    def _entries(self, model, batches) -> dict[int, tuple]:
        """{row: its (values, indices, rest)} over `batches`, the teacher being `model` as it is now, in eval mode."""
        if not self._image_ids:
            self._image_ids = image_token_ids(model)
        was = model.training
        model.eval()  # the teacher as LwF's: in eval mode
        entries: dict[int, tuple] = {}
        device = next(model.parameters()).device
        try:
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
                task_keep, held_keep = self.positions(batch)
                keep = task_keep | held_keep  # a row is the task's or held, never both
                for r, row in enumerate(batch[ROWS].tolist()):
                    z = logits[r][keep[r]]
                    if row in self._allowed:  # a held row answered among choices: the teacher over their tokens only
                        z = restrict(z, self._allowed[row])
                    entries[row] = tuple(t.cpu() for t in self._top(z))
        finally:
            model.train(was)
        return entries

    @staticmethod
    def _assemble(entries: dict[int, tuple], rows: int) -> TeacherCache:
        missing = sorted(set(range(rows)) - set(entries))
        if missing:
            raise ValueError(f"Distillation: the batches hold no row {missing[0]} (of {rows})")
        order = [entries[r] for r in range(rows)]
        offsets = torch.zeros(rows + 1, dtype=torch.long)
        offsets[1:] = torch.tensor([len(e[0]) for e in order], dtype=torch.long).cumsum(0)
        return TeacherCache(torch.cat([e[0] for e in order]), torch.cat([e[1] for e in order]),
                            torch.cat([e[2] for e in order]), offsets)

    def _top(self, logits: torch.Tensor):
        """(values [P, k] float32, indices [P, k] int32, rest [P] float32) of log_softmax(logits / T)."""
        lp = torch.log_softmax(logits.float() / self.temperature, -1)
        k = lp.shape[-1] if self.top_k is None else min(self.top_k, lp.shape[-1])
        if k == lp.shape[-1]:  # the whole vocabulary, in its own order: nothing outside it
            idx = torch.arange(k, device=lp.device).expand_as(lp)
            return lp, idx.to(torch.int32), torch.full(lp.shape[:-1], float("-inf"), device=lp.device)
        v, idx = lp.topk(k, -1)
        rest = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
        return v, idx.to(torch.int32), rest

    def positions(self, batch: dict, images: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L] bool, [B, L] bool): where the term holds the task's own rows (every non-padding position, less the
        image placeholders unless image_positions (or `images`), less the answer predictions without `answers`), and
        where it holds the held rows (their answer predictions, batch["held"]; none without)."""
        keep = batch["attention_mask"].bool()
        if not (self.image_positions if images is None else images) and self._image_ids:
            keep = keep & ~torch.isin(batch["input_ids"], torch.tensor(self._image_ids, device=keep.device))
        if not self.answers:  # not where the task's answer is predicted: there the term pulls against it
            keep = keep.clone()
            keep[:, :-1] &= batch["labels"][:, 1:] == IGNORE_INDEX
        held = batch.get(HELD)
        if held is None:
            return keep, torch.zeros_like(keep)
        return keep & ~held.any(-1, keepdim=True), held

    # ---- the term, every step ----

    def _parts(self):
        return (self.weight, self.held_weight) if self.held_weight > 0 else (self.weight,)

    def counts(self, batch: dict) -> torch.Tensor:
        """What each part is averaged over: the task's rows' positions with the image placeholders counted even when
        they are not held (their KL counts as 0), so that each held position weighs what it weighs in the exact
        term over every position; the held rows' answer predictions."""
        keeps = self.positions(batch, images=True)[:len(self._parts())]
        return torch.stack([k.sum() for k in keeps]).float()

    def __call__(self, model, batch: dict, out) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("Distillation: prepare(model, processor, examples) before the first step")
        if ROWS not in batch:
            raise InputError("Distillation: the batch does not say which prepared rows it holds (batch['rows']); "
                             "build it with Distillation.collator or the loop's training_batches")
        logits = out.logits
        sums = []
        for weight, keep in zip(self._parts(), self.positions(batch)):
            rows = keep.any(-1).nonzero().flatten()
            if len(rows) == 0 or weight == 0:
                sums.append(logits.sum() * 0.0)
                continue
            ids = batch[ROWS][rows].cpu()
            values, indices, rest, n = self.cache.rows(ids)
            have = keep[rows].sum(-1).tolist()
            if have != n:
                raise InputError(f"Distillation: a batch row has {have} positions to hold where the teacher's cache "
                                 f"has {n}: the batch was not made from the prepared examples")
            at = keep.reshape(-1).nonzero().flatten()  # row-major: row by row, positions ascending
            sums.append(weight * self._kl(logits.reshape(-1, logits.shape[-1]), at, values, indices, rest))
        return torch.stack(sums)

    def _kl(self, logits: torch.Tensor, at: torch.Tensor, values, indices, rest) -> torch.Tensor:
        """T² Σ_positions KL over the teacher's top k and the bucket of the rest (module docstring): logits [M, V]
        the student's, `at` [N] the rows of the cached positions, in the cache's order."""
        dev = logits.device
        return _CachedKL.apply(logits, at.to(dev), values.to(dev), indices.to(dev).long(), rest.to(dev),
                               self.temperature)

    # ---- batches that name their rows (a Trainer's collator) ----

    def collator(self, processor, held_per_step: int = 0, seed: int = 0, rank: int = 0, world: int = 1):
        """A data collator for the prepared examples: their batch, plus held rows: `held_per_step` per step drawn from
        a seeded shuffle as the loop draws them, of which this process takes its share (every world-th), each row
        saying which cached entry is its (batch["rows"]). The examples must be the prepared objects themselves (e.g.
        a Trainer's train_dataset = the list given to prepare)."""
        from piece_mm.batching import _epochs
        where = {id(ex): i for i, ex in enumerate(self.examples)}
        draws = _epochs(random.Random(seed + 1), len(self.held), held_per_step) if held_per_step and self.held \
            else None

        def make(examples):
            try:
                ids = [where[id(ex)] for ex in examples]
            except KeyError:
                raise InputError("Distillation.collator: an example that was not given to prepare(); pass the same "
                                 "list as the dataset") from None
            extra = next(draws)[rank::world] if draws is not None else []
            batch = collate(processor, list(examples) + [self.held[j] for j in extra], held=len(extra))
            batch[ROWS] = torch.tensor(ids + [len(self.examples) + j for j in extra], dtype=torch.long)
            return batch
        return make
