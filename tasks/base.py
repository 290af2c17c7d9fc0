"""What every task yields, and how answers are compared. Data only: nothing here knows about models."""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_TOKEN = "<image>"  # LLaVA-JSON's placeholder for where the picture goes


@dataclass
class Example:
    image: Image.Image | Path | None  # a decoded picture, a file opened when needed, or None (text-only)
    prompt: str  # the last user turn
    answer: str  # the last assistant turn: the target, and what a test prediction is scored against
    refs: tuple = field(default=())  # reference captions, for captioning examples
    answers: tuple = field(default=())  # every annotator's answer (VQA-v2), for the vqa metric
    history: tuple = field(default=())  # earlier ((user, assistant), ...) turns; training learns every answer
    image_first: bool = True  # the image comes before the first user turn's text (False: after it)
    choices: tuple = field(default=())  # a held row's: the answers its reply was chosen among (methods/held.py)


def load_image(ex: Example) -> Image.Image | None:
    """The example's picture as RGB; a file that cannot be decoded is bad input (named in the error)."""
    if ex.image is None or isinstance(ex.image, Image.Image):
        return ex.image
    try:
        with Image.open(ex.image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{ex.image}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{ex.image}: not a readable image ({e})") from None


def chat_messages(prompt: str, answer: str | None = None, with_image: bool = True, history: tuple = (),
                  image_first: bool = True) -> list[dict]:
    """The conversation that a processor's chat template renders: the earlier turns, the last user turn, and
    optionally the assistant's reply. The image goes into the first user turn."""
    msgs = []
    for k, (user, reply) in enumerate(list(history) + [(prompt, answer)]):
        content = [{"type": "text", "text": user}]
        if k == 0 and with_image:
            content.insert(0 if image_first else 1, {"type": "image"})
        msgs.append({"role": "user", "content": content})
        if reply is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return msgs


_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and articles dropped, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def contains_match(prediction: str, answer: str) -> float:
    """1 if the answer appears in the prediction as whole words ("it is red" contains "red", not "reddish")."""
    a = normalize_answer(answer)
    return float(bool(a) and f" {a} " in f" {normalize_answer(prediction)} ")


# As the official VQA evaluator does: number words become digits, and common contractions get their apostrophe.
_NUMBERS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                              "nine", "ten"])} | {"none": "0"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                 "havent": "haven't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "couldnt": "couldn't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                 "whats": "what's", "its": "it's", "lets": "let's"}


def normalize_vqa(text: str) -> str:
    """normalize_answer, then number words as digits and contractions spelled one way, so "two" = "2" and
    "don't" = "dont", as in the official VQA evaluation."""
    words = normalize_answer(text.replace("'", "")).split()
    return " ".join(_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in words)


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA accuracy: min(#annotators who gave the predicted answer / 3, 1), answers compared by normalize_vqa."""
    p = normalize_vqa(prediction)
    return min(sum(normalize_vqa(a) == p for a in answers) / 3.0, 1.0)


def most_common_answer(answers) -> str:
    """The training target of a VQA question: its most frequent answer (ties: the first given)."""
    return Counter(answers).most_common(1)[0][0]


# metric name -> fn(prediction, example) -> score in [0, 1]
METRICS = {
    "exact": lambda pred, ex: exact_match(pred, ex.answer),
    "contains": lambda pred, ex: contains_match(pred, ex.answer),
    "vqa": lambda pred, ex: vqa_accuracy(pred, ex.answers or (ex.answer,)),
}
