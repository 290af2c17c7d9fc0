"""Held prompts: the distillation term on prompts that a task does not show.

Distilling on the task's own sequences holds the model only where the task looks. A task whose answers share a
format with other prompts (yes / no, one short word) then teaches that format to every prompt: "which shape do you
see" answered "yes". So before a task is trained, the model as it begins (the teacher) answers other prompts about
some of the task's own images, and each step holds its answers there beside the task's batch:
- a bank of generic prompts (configs/prompts/<bank>.yaml: captions, open and closed questions);
- the earlier tasks' prompts, as strings (never their images, nor their answers unless `earlier_form`), so that a
  later task whose prompt is a near twin cannot take their answers over.
No data of an earlier task and no general-set image is used: the images are the current task's, the replies the
model's own. With `earlier_form`, an earlier task's prompt is answered among that task's own answers (the strings it
was trained to give, never its images), the one the model finds likeliest, and the term holds the model's
distribution over those answers' tokens, as LwF holds an old task's head over its own classes: asked of pictures unlike
its task's, the free reply is often no answer of the task at all ("where is the shape" answered "circle" where the
task answers a grid cell), and holding it would teach the prompt that.
The examples are written to <output>/distill/<task>.held.json, so a resumed task holds the same ones.

With `bank_teacher: base` the bank's prompts are answered, and held, by the model before the first task instead of the
model as the task began: the general answers a task drifts (on the tiny bases, a shape or a size called by the wrong
word in the captions) then do not become the next task's teacher, to be held there and drifted further. The sparse
methods change only the elements a task chose, so the base is the model as it is with those elements' values from
before the first task that chose them: recorded in <output>/distill/base-values.safetensors as each task's mask is
chosen (record_base), and put back while the base answers (at_base). The earlier tasks' prompts are still answered
by the model as the task began: the base never learned them.

With `paraphrases` (a share), a bank prompt that the model as the task begins answers as it answers the task's own
prompt, on at least that share of 32 of the task's images, is taken for a rewording of the task's question: the task
is to change it, so it is not held (paraphrases).
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
import yaml

from piece_mm.configs import DIR as CONFIGS
from piece_mm.errors import InputError
from piece_mm.tasks.base import Example

BANK_DIR = CONFIGS / "prompts"


def load_bank(name: str) -> list[str]:
    """A prompt bank: a YAML path, or a name in configs/prompts ({prompts: [str, ...]})."""
    path = Path(name)
    if not path.is_file():
        path = BANK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"distill.held.bank {name!r}: prompt bank not found (nor {path})")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(f"{path}: field 'prompts' is {prompts!r:.60}; expected a non-empty list of prompts")
    return list(dict.fromkeys(prompts))


def spellable(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts that the tokenizer spells without its unknown token (all of them for a byte-level tokenizer)."""
    from piece_mm.batching import first_unknown_word
    return [p for p in prompts if first_unknown_word(tokenizer, [p]) is None]


def earlier_prompts(earlier_tasks: list, per_task: int) -> list[str]:
    """Up to `per_task` distinct prompts of each earlier task, in their training order: strings, never their images
    or answers."""
    out = []
    for t in earlier_tasks:
        out += list(dict.fromkeys(ex.prompt for ex in t.train))[:per_task]
    return list(dict.fromkeys(out))


FORM_MAX = 64  # an earlier task with more distinct answers than this is free-form: its prompts are held as replied


def earlier_answers(earlier_tasks: list) -> dict[str, tuple[str, ...]]:
    """{prompt: the answers it was trained to give} over the earlier tasks that ask it, for the tasks with at most
    FORM_MAX distinct answers (strings only, never their images)."""
    out: dict[str, dict] = {}
    free = set()  # prompts a free-form task asks: held as replied
    for t in earlier_tasks:
        answers = dict.fromkeys(ex.answer for ex in t.train)
        prompts = dict.fromkeys(ex.prompt for ex in t.train)
        if len(answers) > FORM_MAX:
            free.update(prompts)
            continue
        for p in prompts:
            out.setdefault(p, {}).update(answers)
    return {p: tuple(a) for p, a in out.items() if len(a) <= FORM_MAX and p not in free}


@torch.no_grad()
def likeliest(model, processor, asked: list[Example], choices: list[tuple[str, ...]],
              batch_size: int = 16) -> list[str]:
    """For each asked example, the choice with the highest log-likelihood under the model (the sum over its answer's
    tokens, its end included)."""
    from piece_mm.batching import IGNORE_INDEX, collate, model_inputs
    flat = [(i, Example(ex.image, ex.prompt, c)) for i, (ex, cs) in enumerate(zip(asked, choices)) for c in cs]
    scores = []
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for j in range(0, len(flat), batch_size):
            batch = collate(processor, [ex for _, ex in flat[j:j + batch_size]])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
            lp = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
            labels = batch["labels"][:, 1:]
            got = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            scores += (got * (labels != IGNORE_INDEX)).sum(-1).tolist()
    finally:
        model.train(was)
    best: dict[int, tuple[float, str]] = {}
    for (i, ex), s in zip(flat, scores):
        if i not in best or s > best[i][0]:
            best[i] = (s, ex.answer)
    return [best[i][1] for i in range(len(asked))]


def crop_boxes(n: int, share: float, seed: int) -> list[tuple[float, float, float, float] | None]:
    """For each of n held rows, None (the whole picture) or a crop box (left, top, right, bottom as fractions of the
    picture): `share` of them, seeded, each a square-ish window of 35-65 % of each side."""
    rng = random.Random(seed + 7919)
    boxes = []
    for _ in range(n):
        if rng.random() >= share:
            boxes.append(None)
            continue
        w, h = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        boxes.append((round(x, 4), round(y, 4), round(x + w, 4), round(y + h, 4)))
    return boxes


def cropped(ex: Example, box) -> object:
    """The example's picture cut to `box` (fractions) and scaled back to its size; the picture itself for None."""
    if box is None:
        return ex.image
    from PIL import Image

    from piece_mm.tasks.base import load_image
    im = load_image(ex)
    W, H = im.size
    return im.crop((round(box[0] * W), round(box[1] * H), round(box[2] * W), round(box[3] * H))).resize(
        (W, H), Image.BICUBIC)


def held_pairs(n_images: int, groups: list[tuple[list[str], float]], pool: int, seed: int) -> list[tuple[int, str]]:
    """`pool` (image index, prompt) pairs: the images in turn, each with a prompt. Each group of prompts (prompts,
    share) takes its share of the pool (the first group the rest), going through seeded shuffles of its prompts, so
    that every prompt of a group is asked about as many images as can be."""
    groups = [(list(ps), share) for ps, share in groups if ps]
    sizes = [round(share * pool) for _, share in groups[1:]]
    sizes = [pool - sum(sizes)] + sizes
    rng = random.Random(seed)
    prompts = []
    for (ps, _), n in zip(groups, sizes):
        order: list[str] = []
        for _ in range(n):
            if not order:
                order = list(ps)
                rng.shuffle(order)
            prompts.append(order.pop())
    rng.shuffle(prompts)  # the groups mixed through the pool (a step's draw takes some of each)
    return [(j % n_images, p) for j, p in enumerate(prompts)]


def make_held(model, processor, examples: list, options: dict, generate, earlier: list[str] = (), seed: int = 0,
              log=None, answers: dict | None = None,
              base=None) -> tuple[list[Example], list[tuple[int, str]]]:
    """(held examples, their (image index, prompt[, crop box]) pairs): `options["pool"]` of the examples' images (a
    seeded draw; with `options["crops"]` that share of the rows asks about a crop of its picture, crop_boxes)
    asked the bank's prompts and the `earlier` prompts (strings), none of the examples' own, answered greedily by
    the model as it is now through `generate(model, processor, examples, max_new_tokens)`; with
    `options["earlier_form"]`, an earlier prompt that `answers` ({prompt: its task's answers}) lists is answered
    with the likeliest of them instead, and the example keeps them as its choices. `base`: a context manager
    factory under which the model is the base (at_base); the bank's prompts are then answered inside it."""
    images = _images(examples, options, seed)
    own = {ex.prompt for ex in examples}  # the task's own prompts are learned, not held
    bank = [p for p in spellable(processor.tokenizer, load_bank(options["bank"])) if p not in own]
    if options.get("paraphrases", 0) > 0 and bank:  # nor are its rewordings
        reworded = paraphrases(model, processor, images[:PARAPHRASE_IMAGES], bank, generate, options)
        if log and reworded:
            log(f"not held, answered as the task's own prompt: {', '.join(repr(p) for p in reworded)}")
        bank = [p for p in bank if p not in reworded]
    earlier = [p for p in earlier if p not in own]
    if not bank + earlier:
        raise InputError(f"distill.held.bank {options['bank']!r}: no prompt left to hold (the tokenizer cannot spell "
                         "the bank's, and the task asks the rest itself)")
    pairs = held_pairs(len(images), [(bank, 1.0), (earlier, options["earlier_share"] if bank else 1.0)],
                       options["pool"], seed)
    boxes = crop_boxes(len(pairs), options.get("crops", 0.0), seed)
    asked = [Example(cropped(images[i], box), p, "") for (i, p), box in zip(pairs, boxes)]
    formed = {}
    if options.get("earlier_form") and answers:
        formed = {j: answers[ex.prompt] for j, ex in enumerate(asked) if ex.prompt in answers and ex.prompt not in bank}
    free = [j for j in range(len(asked)) if j not in formed]
    replies = [""] * len(asked)
    on_bank = set(bank_rows(asked, earlier)) if base is not None else set()
    for rows, where in (([j for j in free if j not in on_bank], contextlib.nullcontext),
                        ([j for j in free if j in on_bank], base)):
        if rows:
            with where():
                for j, r in zip(rows, generate(model, processor, [asked[j] for j in rows], options["max_new_tokens"])):
                    replies[j] = r
    if formed:
        chosen = likeliest(model, processor, [asked[j] for j in formed], list(formed.values()))
        for j, r in zip(formed, chosen):
            replies[j] = r
    if log:
        log(f"holding {len(bank)} prompts of the bank and {len(earlier)} of earlier tasks on {len(pairs)} of its "
            "images" + (f", {len(formed)} of them answered in their task's form" if formed else ""))
    held = [Example(ex.image, ex.prompt, a, choices=formed.get(j, ())) for j, (ex, a) in enumerate(zip(asked, replies))]
    return held, [(i, p, box) if box else (i, p) for (i, p), box in zip(pairs, boxes)]


PARAPHRASE_IMAGES = 32  # the task's images a bank prompt is compared on (distill.held.paraphrases)


def paraphrases(model, processor, examples: list, bank: list[str], generate, options: dict) -> list[str]:
    """The bank's prompts that the model answers, on at least `options["paraphrases"]` of the `examples`' images, as
    it answers each example's own prompt there (greedy replies, compared lower-cased and stripped): rewordings of the
    task's question, which the task is to change, not hold."""
    n = options["max_new_tokens"]
    norm = [r.strip().lower() for r in generate(model, processor, examples, n)]
    asked = [Example(ex.image, p, "") for p in bank for ex in examples]
    replies = [r.strip().lower() for r in generate(model, processor, asked, n)]
    out = []
    for k, p in enumerate(bank):
        mine = replies[k * len(examples):(k + 1) * len(examples)]
        if sum(a == b for a, b in zip(mine, norm)) >= options["paraphrases"] * len(examples):
            out.append(p)
    return out


def bank_rows(held: list, earlier: list[str]) -> list[int]:
    """The held rows that ask the bank's prompts: those whose prompt is none of the `earlier` tasks' (a prompt that is
    both is an earlier task's, which the base never learned)."""
    earlier = set(earlier)
    return [j for j, ex in enumerate(held) if ex.prompt not in earlier]


BASE_FILE = "base-values.safetensors"


def record_base(model, masks: dict, path: Path) -> None:
    """Add to the record at `path` the current values of the masked elements that it does not hold yet. A sparse
    method changes an element only in a task that chose it, so called as each task's mask is chosen, before a step,
    the record holds the base value of every element chosen so far. Written atomically."""
    from piece_mm.delta import load_delta, save_delta
    rec = load_delta(path) if Path(path).is_file() else {}
    params = dict(model.named_parameters())
    union, values = {}, {}
    for n in sorted(set(rec) | set(masks)):
        flat = params[n].detach().reshape(-1).cpu()
        idx, vals = rec.get(n, (torch.zeros(0, dtype=torch.int64), flat[:0]))
        if n in masks:
            new = masks[n].to(torch.int64).cpu()
            new = new[~torch.isin(new, idx)]
            idx, vals = torch.cat([idx, new]), torch.cat([vals, flat[new]])
        union[n], values[n] = idx, vals
    save_delta(model, union, path, values=values)


@contextlib.contextmanager
def at_base(model, record: dict):
    """The model with the recorded base values (record_base, read with delta.load_delta) put back, restored after."""
    from piece_mm.delta import apply_delta
    params = dict(model.named_parameters())
    now = {n: (idx, params[n].detach().reshape(-1)[idx.to(params[n].device)].cpu().clone())
           for n, (idx, _) in record.items()}
    apply_delta(model, record)
    try:
        yield
    finally:
        apply_delta(model, now)


def _images(examples: list, options: dict, seed: int) -> list:
    pictured = [ex for ex in examples if ex.image is not None] or list(examples)
    return random.Random(seed).sample(pictured, min(len(pictured), options["pool"]))


def held_examples(model, processor, task, ctx, options: dict, base=None) -> list[Example]:
    """This task's held examples (module docstring, make_held): made with the model as the task begins (the bank's
    prompts under `base`, when given), or read back when the task is resumed (<output>/distill/<task>.held.json)."""
    path = Path(ctx.output) / "distill" / f"{ctx.index + 1}-{task.name}.held.json"
    if ctx.resumed:
        images = _images(task.train, options, ctx.seed)
        try:
            saved = json.loads(path.read_text())
            return [Example(cropped(images[r["image"]], r.get("crop")), r["prompt"], r["answer"],
                            choices=tuple(r.get("choices", ()))) for r in saved]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise InputError(f"{path}: not this task's held examples ({e})") from None
    log = (lambda s: ctx.log(f"{task.name}: {s}")) if ctx.log else None
    try:
        held, pairs = make_held(model, processor, task.train, options, ctx.generate,
                                earlier_prompts(ctx.tasks[:ctx.index], options["earlier"]), ctx.seed, log,
                                earlier_answers(ctx.tasks[:ctx.index]) if options.get("earlier_form") else None,
                                base)
    except InputError as e:
        raise InputError(f"{e} (task {task.name!r})") from None
    if ctx.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"image": pair[0], "prompt": pair[1], "answer": ex.answer,
                                    **({"crop": list(pair[2])} if len(pair) > 2 else {}),
                                    **({"choices": list(ex.choices)} if ex.choices else {})}
                                   for pair, ex in zip(pairs, held)], indent=0))
        tmp.replace(path)
    return held


def protect_scores(scores: dict, held_scores: dict, strength: float, sharded: bool = False) -> dict:
    """The task's scores with each weight's importance to the held examples counted against it:
    score / (1 + strength · held / mean(held)), the mean over every scored weight (over the shards, on FSDP2). A
    weight the held prompts lean on keeps less of its task score, so the budget goes to weights that matter to the
    task and not to them; strength 0 leaves the ranking as it was."""
    import torch

    from piece_mm import dist
    total = torch.zeros(2, dtype=torch.float64)  # [sum, count]
    for t in held_scores.values():
        total += torch.tensor([t.double().sum().item(), t.numel()], dtype=torch.float64)
    if sharded:
        dist.sum_([total])
    mean = float(total[0] / max(total[1], 1.0))
    if mean <= 0:
        return scores
    return {n: s / (1.0 + strength * held_scores[n].to(s.device) / mean) for n, s in scores.items()}
