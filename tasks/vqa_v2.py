"""VQA-v2 as released: a questions file {"questions": [{question_id, image_id, question}]} and an annotations file
{"annotations": [{question_id, image_id, question_type, answers: [{answer}], ...}]}, with the COCO images.

A task keeps the questions of some question types: VQACL group names (configs/vqacl_groups.yaml) or raw
`question_type` strings. The training target is the most common of the ten answers; the `vqa` metric scores a
prediction against all of them."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

from .base import Example, most_common_answer
from .jsonio import check_image, field, records

GROUPS_FILE = Path(__file__).resolve().parent.parent / "configs" / "vqacl_groups.yaml"


@lru_cache(maxsize=1)
def groups() -> dict[str, list[str]]:
    with open(GROUPS_FILE) as f:
        return yaml.safe_load(f)


def resolve_types(wanted, where: str) -> set[str] | None:
    """Group names and raw types -> the set of raw question_type strings (None: keep every question)."""
    if wanted is None:
        return None
    if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted):
        raise ValueError(f"{where}.question_types is {wanted!r:.60}; expected a non-empty list of VQACL group names "
                         "or question_type strings")
    return {t for w in wanted for t in groups().get(w, [w])}


def _image_index(images: Path, where: str) -> dict[int, Path]:
    """COCO image id -> file, from the trailing digits of each file name (COCO_val2014_000000000042.jpg -> 42)."""
    if not images.is_dir():
        raise ValueError(f"{where}.images: directory {str(images)!r} not found")
    out = {}
    for f in images.iterdir():
        m = re.search(r"(\d+)$", f.stem)
        if m:
            out[int(m.group(1))] = f
    return out


def load(questions: Path, annotations: Path, images: Path, types: set[str] | None, where: str,
         limit: int | None = None) -> list[Example]:
    qs = records(questions, ("questions",), "questions file")["questions"]
    anns = records(annotations, ("annotations",), "annotations file")["annotations"]
    by_id = {}
    for a in anns:
        by_id[field(annotations, a, "question_id", (int, str))] = a
    index = _image_index(images, where)
    known_types, checked = set(), set()
    out = []
    for q in qs:
        qid = field(questions, q, "question_id", (int, str))
        a = by_id.get(qid)
        if a is None:
            raise ValueError(f"{questions}: {q.where}: question_id {qid!r} has no annotation in {annotations}")
        qtype = field(annotations, a, "question_type", str)
        known_types.add(qtype)
        if types is not None and qtype not in types:
            continue
        if limit is not None and len(out) >= limit:
            continue  # keep reading: every question must still have its annotation
        text = field(questions, q, "question", str)
        answers = field(annotations, a, "answers", list, "a list of {answer}")
        if not answers or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
            raise ValueError(f"{annotations}: {a.where}: field 'answers' is {answers!r:.60}; expected a non-empty "
                             "list of {answer: string}")
        image_id = field(questions, q, "image_id", int)
        if image_id not in index:
            raise ValueError(f"{questions}: {q.where}: image {image_id} not found in {images}")
        if image_id not in checked:  # an image serves several questions: check it once
            check_image(index[image_id], f"{questions}: {q.where}")
            checked.add(image_id)
        words = tuple(x["answer"] for x in answers)
        out.append(Example(index[image_id], text, most_common_answer(words), answers=words))
    if types is not None:
        unknown = sorted(t for t in types - known_types if t not in {x for v in groups().values() for x in v})
        if unknown:
            raise ValueError(f"{where.rsplit('.', 1)[0]}.question_types: {unknown[0]!r} is neither a VQACL group "
                             f"({', '.join(groups())}) nor a question_type in {annotations}")
    return out
