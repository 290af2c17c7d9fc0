"""Examples -> model batches, through the model's own processor and chat template, with the loss on answer tokens only."""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from tasks.base import Example, chat_messages

IGNORE_INDEX = -100


def _answer_suffix(processor, prompt: str, answer: str) -> tuple[str, str]:
    """Render the prompt (with the generation cue) and the text the template appends for the assistant's answer.

    The answer suffix is whatever the full conversation adds after the prompt (answer + end-of-turn token), so the
    label mask follows the model's own template instead of a hard-coded one."""
    prompt_text = processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(chat_messages(prompt, answer), add_generation_prompt=False,
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template: the rendered conversation does not start with the rendered prompt; "
                         f"prompt={prompt_text!r} full={full_text!r}")
    return prompt_text, full_text[len(prompt_text):]


def collate(processor, examples: Sequence[Example]) -> dict:
    """Training batch: input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 outside the answer), plus the
    processor's image tensors (pixel_values, and image_grid_thw / image_sizes where the family uses them)."""
    tok = processor.tokenizer
    prompts, suffixes = zip(*(_answer_suffix(processor, ex.prompt, ex.answer) for ex in examples))
    enc = processor(images=[ex.image for ex in examples], text=list(prompts), return_tensors="pt", padding=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Per-token tensors besides input_ids (Qwen's mm_token_type_ids) are carried along; answer tokens get 0 (text).
    per_token = [k for k, v in enc.items() if k not in ("input_ids", "attention_mask")
                 and torch.is_tensor(v) and v.shape == enc["input_ids"].shape]
    rows, labels, extras = [], [], {k: [] for k in per_token}
    for i, suffix in enumerate(suffixes):
        keep = enc["attention_mask"][i].bool()  # the unpadded prompt, image tokens expanded
        prompt_ids = enc["input_ids"][i][keep]
        answer_ids = torch.tensor(tok(suffix, add_special_tokens=False)["input_ids"], dtype=torch.long)
        rows.append(torch.cat([prompt_ids, answer_ids]))
        labels.append(torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]))
        for k in per_token:
            extras[k].append(torch.cat([enc[k][i][keep], torch.zeros_like(answer_ids, dtype=enc[k].dtype)]))
    length = max(len(r) for r in rows)
    batch = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and k not in per_token}
    batch["input_ids"] = torch.full((len(rows), length), pad_id, dtype=torch.long)
    batch["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
    batch["labels"] = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for k in per_token:
        batch[k] = torch.zeros((len(rows), length), dtype=enc[k].dtype)
    for i, (r, lab) in enumerate(zip(rows, labels)):  # right padding for training
        batch["input_ids"][i, : len(r)] = r
        batch["attention_mask"][i, : len(r)] = 1
        batch["labels"][i, : len(r)] = lab
        for k in per_token:
            batch[k][i, : len(r)] = extras[k][i]
    return batch


def training_batches(processor, examples: Sequence[Example], batch_size: int, steps: int, seed: int,
                     start: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """`steps` batches drawn in epochs of a seeded shuffle; the order depends on the seed alone. `start` skips the
    first batches without building them (a resumed run continues the same order). With world > 1 each batch holds
    this process's share (every world-th example) of the global batch."""
    rng = random.Random(seed)
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        if step >= start:
            yield collate(processor, [examples[i] for i in idx[rank::world]])
