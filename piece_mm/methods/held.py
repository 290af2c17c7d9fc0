"""Held prompts: the distillation term on prompts that a task does not show.

Distilling on the task's own sequences holds the model only where the task looks. A task whose answers share a
format with other prompts (yes / no, one short word) then teaches that format to every prompt: "which shape do you
see" answered "yes". So before a task is trained, the model as it begins (the teacher) answers other prompts about
some of the task's own images, and each step holds its answers there beside the task's batch:
- a bank of generic prompts (configs/prompts/<bank>.yaml: captions, open and closed questions);
- the earlier tasks' prompts, as strings (never their images or answers), so that a later task whose prompt is a
  near twin cannot take their answers over.
No data of an earlier task and no general-set image is used: the images are the current task's, the replies the
model's own. The examples are written to <output>/distill/<task>.held.json, so a resumed task holds the same ones.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

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
              log=None) -> tuple[list[Example], list[tuple[int, str]]]:
    """(held examples, their (image index, prompt) pairs): `options["pool"]` of the examples' images (a seeded draw)
    asked the bank's prompts and the `earlier` prompts (strings), none of the examples' own, answered greedily by
    the model as it is now through `generate(model, processor, examples, max_new_tokens)`."""
    images = _images(examples, options, seed)
    own = {ex.prompt for ex in examples}  # the task's own prompts are learned, not held
    bank = [p for p in spellable(processor.tokenizer, load_bank(options["bank"])) if p not in own]
    earlier = [p for p in earlier if p not in own]
    if not bank + earlier:
        raise InputError(f"distill.held.bank {options['bank']!r}: no prompt left to hold (the tokenizer cannot spell "
                         "the bank's, and the task asks the rest itself)")
    pairs = held_pairs(len(images), [(bank, 1.0), (earlier, options["earlier_share"] if bank else 1.0)],
                       options["pool"], seed)
    asked = [Example(images[i].image, p, "") for i, p in pairs]
    replies = generate(model, processor, asked, options["max_new_tokens"])
    if log:
        log(f"holding {len(bank)} prompts of the bank and {len(earlier)} of earlier tasks on {len(pairs)} of its "
            "images")
    return [Example(ex.image, ex.prompt, a) for ex, a in zip(asked, replies)], pairs


def _images(examples: list, options: dict, seed: int) -> list:
    pictured = [ex for ex in examples if ex.image is not None] or list(examples)
    return random.Random(seed).sample(pictured, min(len(pictured), options["pool"]))


def held_examples(model, processor, task, ctx, options: dict) -> list[Example]:
    """This task's held examples (module docstring, make_held): made with the model as the task begins, or read
    back when the task is resumed (<output>/distill/<task>.held.json)."""
    path = Path(ctx.output) / "distill" / f"{ctx.index + 1}-{task.name}.held.json"
    if ctx.resumed:
        images = _images(task.train, options, ctx.seed)
        try:
            saved = json.loads(path.read_text())
            return [Example(images[r["image"]].image, r["prompt"], r["answer"]) for r in saved]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise InputError(f"{path}: not this task's held examples ({e})") from None
    log = (lambda s: ctx.log(f"{task.name}: {s}")) if ctx.log else None
    try:
        held, pairs = make_held(model, processor, task.train, options, ctx.generate,
                                earlier_prompts(ctx.tasks[:ctx.index], options["earlier"]), ctx.seed, log)
    except InputError as e:
        raise InputError(f"{e} (task {task.name!r})") from None
    if ctx.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"image": i, "prompt": p, "answer": ex.answer} for (i, p), ex in zip(pairs, held)],
                                  indent=0))
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
