"""Batched greedy decoding with the KV cache: the one way every evaluator asks a model for text."""
from __future__ import annotations

from typing import Sequence

import torch

from piece_mm.errors import from_data
from piece_mm.tasks.base import Example, chat_messages, load_image


def prompt_batch(processor, examples: Sequence[Example]) -> dict:
    """The prompts alone, rendered by the model's chat template and left-padded so new tokens line up at the end."""
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(chat_messages(ex.prompt, with_image=ex.image is not None,
                                                           history=ex.history, image_first=ex.image_first),
                                             add_generation_prompt=True, tokenize=False) for ex in examples]
    with from_data():  # an image file gone or unreadable: one line naming it (exit 2)
        images = [im for im in map(load_image, examples) if im is not None] or None
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return dict(enc)


@torch.no_grad()
def generate(model, processor, examples: Sequence[Example], batch_size: int = 64, max_new_tokens: int = 16,
             progress=None) -> list[str]:
    """Greedy answers for `examples`, in order. The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            enc = {k: v.to(device) if torch.is_tensor(v) else v
                   for k, v in prompt_batch(processor, examples[i: i + batch_size]).items()}
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]  # [B, new tokens]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            if progress is not None:
                progress.update(len(new))
    finally:
        model.train(was_training)
    return out
