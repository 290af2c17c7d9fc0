"""What every task yields, and how answers are compared. Data only: nothing here knows about models."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Example:
    image: Image.Image | None
    prompt: str
    answer: str
    refs: tuple = field(default=())  # reference captions, for captioning examples


def chat_messages(prompt: str, answer: str | None = None, with_image: bool = True) -> list[dict]:
    """The conversation that a processor's chat template renders: one user turn, optionally the assistant's reply."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and articles dropped, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))
