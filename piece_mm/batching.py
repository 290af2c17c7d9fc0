"""Examples -> model batches, through the model's own processor and chat template, with the loss on answer tokens
only."""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from piece_mm.errors import from_data
from piece_mm.tasks.base import Example, chat_messages, load_image

IGNORE_INDEX = -100


def global_answer_tokens(batches: list[dict]) -> torch.Tensor:
    """[1] float: the answer tokens (the labels a causal LM predicts) of these batches, summed over every process
    (piece_mm/dist.py), so that each process can divide its summed loss by the whole step's count."""
    from piece_mm import dist
    count = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches).float().reshape(1)
    dist.sum_([count])
    return count


def global_positions(batches: list[dict]) -> torch.Tensor:
    """[1] float: the non-padding positions (attention_mask) of these batches, summed over every process: what a
    per-position term such as distillation is averaged over."""
    from piece_mm import dist
    count = sum(b["attention_mask"].sum() for b in batches).float().reshape(1)
    dist.sum_([count])
    return count


def _pieces(processor, ex: Example) -> list[tuple[str, bool]]:
    """The conversation rendered by the model's own chat template, cut into pieces in order: each user turn (with
    the generation cue) untrained, each assistant reply (answer + end-of-turn) trained. The cuts are where each
    longer rendering extends the shorter one, so the label mask follows the template instead of a hard-coded one."""
    turns = list(ex.history) + [(ex.prompt, ex.answer)]
    with_image = ex.image is not None
    pieces, done = [], ""
    for k, (user, reply) in enumerate(turns):
        history = tuple(turns[:k])
        asked = processor.apply_chat_template(chat_messages(user, None, with_image, history, ex.image_first),
                                              add_generation_prompt=True, tokenize=False)
        answered = processor.apply_chat_template(chat_messages(user, reply, with_image, history, ex.image_first),
                                                 add_generation_prompt=False, tokenize=False)
        if not (asked.startswith(done) and answered.startswith(asked)):
            raise ValueError("chat template: a longer conversation does not extend the shorter one; "
                             f"prompt={asked!r} full={answered!r}")
        pieces += [(asked[len(done):], False), (answered[len(asked):], True)]
        done = answered
    return pieces


HELD = "held"  # a batch's [B, L] mask of the held rows' answer predictions (collate's held=); not a model input
ROWS = "rows"  # a batch's [B] long: each row's place among the task's examples, then its held ones (a regulariser's
#                cache entry, regularise.py); not a model input


def model_inputs(batch: dict) -> dict:
    """What the model is called with: the batch less the loop's own keys."""
    return {k: v for k, v in batch.items() if k not in (HELD, ROWS)}


def collate(processor, examples: Sequence[Example], held: int = 0) -> dict:
    """Training batch: input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 outside the assistant replies),
    plus the processor's image tensors (pixel_values, and image_grid_thw / image_sizes where the family uses them).
    Text-only examples (image None) may share a batch with pictured ones.

    With held = n the last n examples are held, not learned: their labels are -100 and batch["held"] [B, L] marks
    the positions whose next token is their answer (the positions where a distillation term holds them)."""
    tok = processor.tokenizer
    pieces = [_pieces(processor, ex) for ex in examples]
    with from_data():  # an image file gone or unreadable: one line naming it (exit 2)
        images = [im for im in map(load_image, examples) if im is not None] or None
    # the first piece holds the image placeholder: the processor expands it; the rest is plain text
    enc = processor(images=images, text=[p[0][0] for p in pieces], return_tensors="pt", padding=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Per-token tensors besides input_ids (Qwen's mm_token_type_ids) are carried along; later pieces get 0 (text).
    per_token = [k for k, v in enc.items() if k not in ("input_ids", "attention_mask")
                 and torch.is_tensor(v) and v.shape == enc["input_ids"].shape]
    rows, labels, extras = [], [], {k: [] for k in per_token}
    for i, ps in enumerate(pieces):
        keep = enc["attention_mask"][i].bool()  # the unpadded first turn, image tokens expanded
        ids, lab = [enc["input_ids"][i][keep]], [torch.full((int(keep.sum()),), IGNORE_INDEX, dtype=torch.long)]
        for text, trained in ps[1:]:
            t = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(t)
            lab.append(t if trained else torch.full_like(t, IGNORE_INDEX))
        rows.append(torch.cat(ids))
        labels.append(torch.cat(lab))
        for k in per_token:
            rest = len(rows[-1]) - int(keep.sum())
            extras[k].append(torch.cat([enc[k][i][keep], torch.zeros(rest, dtype=enc[k].dtype)]))
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
    if held:
        rows = slice(len(examples) - held, len(examples))
        mask = torch.zeros((len(examples), length), dtype=torch.bool)
        mask[rows, :-1] = batch["labels"][rows, 1:] != IGNORE_INDEX  # position p predicts token p + 1
        batch["labels"][rows] = IGNORE_INDEX
        batch[HELD] = mask
    return batch


def _epochs(rng: random.Random, n: int, size: int) -> Iterator[list[int]]:
    """Batches of `size` indices into n items, drawn in epochs of a seeded shuffle, forever."""
    order: list[int] = []
    while True:
        if len(order) < size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:size], order[size:]
        yield idx


def training_batches(processor, examples: Sequence[Example], batch_size: int, steps: int, seed: int,
                     start: int = 0, rank: int = 0, world: int = 1, micro: int = 1, held: Sequence[Example] = (),
                     held_size: int = 0) -> Iterator[dict | list[dict]]:
    """`steps` batches drawn in epochs of a seeded shuffle; the order depends on the seed alone. `start` skips the
    first batches without building them (a resumed run continues the same order). With world > 1 each batch holds
    this process's share (every world-th example) of the global batch. With micro > 1 each step is a list of `micro`
    batches that split this process's share (gradient accumulation): the same examples as micro = 1.

    With `held` examples, `held_size` of them (drawn the same way, from a shuffle of their own) join each step's
    batch as held rows (collate's held=), shared among processes and micro-batches like the rest."""
    draws = _epochs(random.Random(seed), len(examples), batch_size)
    held_draws = _epochs(random.Random(seed + 1), len(held), held_size) if held and held_size else None
    for step in range(steps):
        idx = next(draws)
        kept = next(held_draws) if held_draws is not None else []
        if step >= start:
            mine = idx[rank::world]
            also = [len(examples) + i for i in kept[rank::world]]
            if micro == 1:
                yield _rows_batch(processor, examples, held, mine, also)
            else:
                size, hsize = -(-len(mine) // micro), -(-len(also) // micro)
                yield [_rows_batch(processor, examples, held, mine[j * size:(j + 1) * size],
                                   also[j * hsize:(j + 1) * hsize]) for j in range(micro)
                       if mine[j * size:(j + 1) * size]]


def _rows_batch(processor, examples, held, mine: list[int], also: list[int]) -> dict:
    """collate of examples[mine] and the held rows held[also - len(examples)], with batch["rows"] naming them."""
    batch = collate(processor, [examples[i] for i in mine] + [held[i - len(examples)] for i in also],
                    held=len(also))
    batch[ROWS] = torch.tensor(mine + also, dtype=torch.long)
    return batch


def fit_length(processor, examples: Sequence[Example], max_length: int) -> tuple[list[Example], int]:
    """(the examples whose whole training sequence, image tokens included, fits in max_length tokens; how many did
    not). An example that does not fit is left out, never cut: cutting would drop its answer's tokens."""
    kept = [ex for ex in examples if collate(processor, [ex])["input_ids"].shape[1] <= max_length]
    return kept, len(examples) - len(kept)


def first_unknown_word(tokenizer, texts) -> tuple[int, str] | None:
    """(index into texts, word) of the first word the tokenizer turns into its unknown token, or None. A tokenizer
    with no unknown token (byte-level BPE) knows every word. Words are split on whitespace, punctuation stripped."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    seen: dict[str, bool] = {}
    for i, text in enumerate(texts):
        for raw in str(text).split():
            word = raw.strip(".,;:!?\"'()[]")
            if not word:
                continue
            if word not in seen:
                seen[word] = unk in tokenizer(word, add_special_tokens=False)["input_ids"]
            if seen[word]:
                return i, word
    return None
