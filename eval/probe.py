"""The prompt-conditioning probe: before any tuning, does the prompt decide what a model says?

    python -m piece_mm.experiments.probe --model llava     # the default sequence (configs/sequences/world.yaml)
    python -m piece_mm.experiments.probe --model <dir or HF id> --tasks my.yaml --limit 200 --output probe.json

A real instruction-tuned VLM answers "what is the colour in Spanish" with a Spanish word (or tries to) and "describe
the image" with a caption; a base that does not tell the prompts apart ties whatever a task teaches to the picture,
and the task's words then come out in every caption. On the held-out caption images of a sequence (with their
reference captions) the probe asks the captioning prompt and each task's prompts about the same images, and reports
per task:
- caption_leak: the share of captions that use a word of the task's answers that no reference caption uses
  (piece_mm.eval.captioning.answer_leak), before any tuning: a base should be at 0;
- reply_is_caption: the share of task replies that are the caption of the same image (the task prompt ignored);
- reply_in_vocabulary: the share of task replies that are one of the task's answers (the skill already there, or a
  vocabulary the prompt names);
- zero_shot: the task's own metric on its test examples (a new skill starts near 0).
`caption_leak` at the top is the same share over every task's answers at once. It works for any model that the
project loads (real checkpoints included) and any sequence: nothing in it is specific to the built-in world. It is
handed the model (experiments/probe.py loads it for the command line).
"""
from __future__ import annotations

from typing import Sequence

from piece_mm.tasks.base import METRICS, Example, normalize_answer


def probe(model, processor, captions: Sequence[Example], tasks: Sequence, batch_size: int = 64,
          max_new_tokens: int = 24) -> dict:
    """The probe's record for `model` on `captions` (examples with refs, asked with their own caption prompt) and
    `tasks` (tasks.sequence.Task: name, train, test, metric). Generation is greedy; nothing is trained."""
    from .captioning import answer_leak
    from .generate import generate

    refs = [ex.refs or (ex.answer,) for ex in captions]
    preds = generate(model, processor, captions, batch_size=batch_size, max_new_tokens=max_new_tokens)
    every = {ex.answer for t in tasks for ex in list(t.train) + list(t.test)}
    out = {"captions": len(captions), "caption_leak": answer_leak(preds, refs, every)["answer_leak"], "tasks": {},
           "samples": []}
    norm_caps = [normalize_answer(p) for p in preds]
    for t in tasks:
        answers = {ex.answer for ex in list(t.train) + list(t.test)}
        prompts = sorted({ex.prompt for ex in t.test}) or sorted({ex.prompt for ex in t.train})
        # the task's prompts in turn over the caption images, so every image is asked one task prompt
        asked = [Example(ex.image, prompts[i % len(prompts)], "", image_first=ex.image_first)
                 for i, ex in enumerate(captions)]
        replies = generate(model, processor, asked, batch_size=batch_size, max_new_tokens=max_new_tokens)
        vocab = {normalize_answer(a) for a in answers}
        n = max(1, len(replies))
        test = list(t.test)[: len(captions)]
        own = generate(model, processor, test, batch_size=batch_size, max_new_tokens=8)
        metric = METRICS[t.metric]
        out["tasks"][t.name] = {
            "prompts": prompts,
            "caption_leak": answer_leak(preds, refs, answers)["answer_leak"],
            "reply_is_caption": sum(normalize_answer(r) == c for r, c in zip(replies, norm_caps)) / n,
            "reply_in_vocabulary": sum(normalize_answer(r) in vocab for r in replies) / n,
            "zero_shot": sum(metric(a, ex) for a, ex in zip(own, test)) / max(1, len(test)),
        }
        out["samples"] += [{"task": t.name, "prompt": asked[i].prompt, "reply": replies[i], "caption": preds[i]}
                           for i in range(min(2, len(asked)))]
    return out


def format_table(record: dict) -> str:
    lines = [f"caption leak over every task's answers: {record['caption_leak']:.3f} ({record['captions']} captions)",
             "task".ljust(12) + "caption_leak".rjust(14) + "reply_is_caption".rjust(18)
             + "reply_in_vocab".rjust(16) + "zero_shot".rjust(11)]
    for name, r in record["tasks"].items():
        lines.append(name[:12].ljust(12) + f"{r['caption_leak']:14.3f}{r['reply_is_caption']:18.3f}"
                     f"{r['reply_in_vocabulary']:16.3f}{r['zero_shot']:11.3f}")
    return "\n".join(lines)
