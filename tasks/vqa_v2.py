"""VQA-v2 as released: a questions file {"questions": [{question_id, image_id, question}]} and an annotations file
{"annotations": [{question_id, image_id, question_type, answers: [{answer}], ...}]}, with the COCO images.

A task keeps the questions of some question types: VQACL group names (configs/vqacl_groups.yaml) or raw
`question_type` strings; all of them, the first `limit`, or a fixed random `sample`. The training target is the most
common of the ten answers; the `vqa` metric scores a prediction against all of them."""
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


@lru_cache(maxsize=8)
def _image_index_cached(images: Path, stamp: int) -> dict[int, Path]:
    out = {}
    for f in images.iterdir():
        m = re.search(r"(\d+)$", f.stem)
        if m:
            out[int(m.group(1))] = f
    return out


def _image_index(images: Path, where: str) -> dict[int, Path]:
    """COCO image id -> file, from the trailing digits of each file name (COCO_val2014_000000000042.jpg -> 42); read
    once per directory (COCO's train2014 holds 82,783 files, which every task of a sequence shares)."""
    if not images.is_dir():
        raise ValueError(f"{where}.images: directory {str(images)!r} not found")
    return _image_index_cached(images.resolve(), images.stat().st_mtime_ns)


def _stamp(path: Path) -> tuple:
    st = path.stat() if path.is_file() else None
    return (str(path.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0)


@lru_cache(maxsize=4)
def _questions(key: tuple) -> list[tuple]:
    """[(where, question_id, image_id, question)] of a questions file, each record checked; read once per file (the
    official train file is 300k questions, shared by every task of a sequence)."""
    path = Path(key[0])
    out = []
    for q in records(path, ("questions",), "questions file")["questions"]:
        out.append((q.where, field(path, q, "question_id", (int, str)), field(path, q, "image_id", int),
                    field(path, q, "question", str)))
    return out


@lru_cache(maxsize=4)
def _annotations(key: tuple) -> dict:
    """{question_id: (where, question_type, answers)} of an annotations file, each record checked; read once per
    file."""
    path = Path(key[0])
    out = {}
    for a in records(path, ("annotations",), "annotations file")["annotations"]:
        qid = field(path, a, "question_id", (int, str))
        qtype = field(path, a, "question_type", str)
        answers = field(path, a, "answers", list, "a list of {answer}")
        if not answers or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
            raise ValueError(f"{path}: {a.where}: field 'answers' is {answers!r:.60}; expected a non-empty "
                             "list of {answer: string}")
        out[qid] = (a.where, qtype, tuple(x["answer"] for x in answers))
    return out


def load(questions: Path, annotations: Path, images: Path, types: set[str] | None, where: str,
         limit: int | None = None, sample: int | None = None) -> list[Example]:
    """The questions of the chosen types, with their answers and images: the first `limit` in file order, or
    `sample` of them drawn at random with a fixed seed (the same draw for every run, method and seed, as the PIECE
    authors' fixed 1,000-example files), kept in file order."""
    qs, by_id = _questions(_stamp(questions)), _annotations(_stamp(annotations))
    known_types = {a[1] for a in by_id.values()}
    kept = []
    for q_where, qid, image_id, text in qs:
        a = by_id.get(qid)
        if a is None:
            raise ValueError(f"{questions}: {q_where}: question_id {qid!r} has no annotation in {annotations}")
        if types is None or a[1] in types:
            kept.append((q_where, image_id, text, a[2]))
    if sample is not None and len(kept) > sample:
        import random
        chosen = sorted(random.Random(0).sample(range(len(kept)), sample))
        kept = [kept[i] for i in chosen]
    elif limit is not None:
        kept = kept[:limit]
    index = _image_index(images, where)
    checked, out = set(), []
    for q_where, image_id, text, words in kept:
        if image_id not in index:
            raise ValueError(f"{questions}: {q_where}: image {image_id} not found in {images}")
        if image_id not in checked:  # an image serves several questions: check it once
            check_image(index[image_id], f"{questions}: {q_where}")
            checked.add(image_id)
        out.append(Example(index[image_id], text, most_common_answer(words), answers=words))
    if types is not None:
        unknown = sorted(t for t in types - known_types if t not in {x for v in groups().values() for x in v})
        if unknown:
            raise ValueError(f"{where.rsplit('.', 1)[0]}.question_types: {unknown[0]!r} is neither a VQACL group "
                             f"({', '.join(groups())}) nor a question_type in {annotations}")
    return out
