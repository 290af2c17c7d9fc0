"""Reading users' JSON / JSONL files so that every problem names the file, the record, its line and the field.

`records(path)` returns the records of a top-level list (JSON array or JSONL) or of the lists under the given keys of a
top-level object, each with the line it starts on, so a later check can still say where a bad record is."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

_WS = " \t\n\r"


class Record(dict):
    """A JSON object with where it came from: `where` = 'records[3] (id 'x', line 12)'."""
    where: str = ""


class _Lines:
    """Line numbers of increasing positions in one text, counted incrementally (a 300 MB file stays linear)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:  # not expected (positions only grow), but stay correct
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _array(text: str, pos: int, path: Path, label: str, dec: json.JSONDecoder, lines: _Lines) -> tuple[list, int]:
    """Parse the JSON array at text[pos] ('['), keeping each element's start line."""
    out, pos = [], _skip(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return out, pos + 1
    while True:
        start = pos
        obj, pos = dec.raw_decode(text, pos)
        out.append(_record(obj, label, len(out), lines(start), path))
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return out, pos + 1
        else:
            raise json.JSONDecodeError("expected ',' or ']'", text, pos)


def _record(obj, label: str, i: int, line: int, path: Path) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {label}[{i}] (line {line}) is {type(obj).__name__}; expected an object")
    r = Record(obj)
    ident = obj.get("id", obj.get("question_id", obj.get("image_id")))
    r.where = f"{label}[{i}] (" + (f"id {ident!r}, " if ident is not None else "") + f"line {line})"
    return r


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def records(path: Path, keys: tuple = (), what: str = "data file") -> dict | list:
    """A JSON array / JSONL file -> its records; a JSON object -> {key: its records} for each key in `keys` (which
    must hold lists). Every record must be a JSON object; each comes as a Record (with .where)."""
    path = Path(path)
    text = _read_text(path, what)
    dec = json.JSONDecoder()
    if path.suffix == ".jsonl":
        out = []
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
            out.append(_record(obj, "records", len(out), n, path))
        return out
    try:
        pos = _skip(text, 0)
        lines = _Lines(text)
        if text[pos:pos + 1] == "[" and not keys:
            out, end = _array(text, pos, path, "records", dec, lines)
        elif text[pos:pos + 1] == "{" and keys:
            out, end = _object(text, pos, path, keys, dec, lines)
        else:
            obj, end = dec.raw_decode(text, pos)  # valid JSON of the wrong kind, or an error with its place
            want = "an object with " + ", ".join(keys) if keys else "a list of records"
            raise ValueError(f"{path}: top level is {type(obj).__name__}; expected {want}")
        if _skip(text, end) != len(text):
            raise json.JSONDecodeError("extra data", text, _skip(text, end))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    return out


def _object(text: str, pos: int, path: Path, keys: tuple, dec: json.JSONDecoder, lines: _Lines) -> tuple[dict, int]:
    found, pos = {}, _skip(text, pos + 1)
    while text[pos:pos + 1] != "}":
        key, pos = dec.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos:pos + 1] != ":":
            raise json.JSONDecodeError("expected ':'", text, pos)
        pos = _skip(text, pos + 1)
        if key in keys and text[pos:pos + 1] == "[":
            found[key], pos = _array(text, pos, path, key, dec, lines)
        else:
            value, pos = dec.raw_decode(text, pos)
            if key in keys:
                raise ValueError(f"{path}: field {key!r} is {type(value).__name__}; expected a list")
        pos = _skip(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos:pos + 1] != "}":
            raise json.JSONDecodeError("expected ',' or '}'", text, pos)
    for k in keys:
        if k not in found:
            raise ValueError(f"{path}: field {k!r} is missing; expected a list")
    return found, pos + 1


def field(path: Path, rec, name: str, kind, what: str = ""):
    """rec[name], checked to be of `kind`; the error names the file, the record and the field."""
    where = getattr(rec, "where", "record")
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: {where} is {type(rec).__name__}; expected an object")
    if name not in rec:
        raise ValueError(f"{path}: {where}: field {name!r} is missing")
    v = rec[name]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise ValueError(f"{path}: {where}: field {name!r} is {v!r:.60}; expected {what or _kind_name(kind)}")
    return v


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "list": "a list", "int": "an integer", "dict": "an object"}
                       .get(k.__name__, k.__name__) for k in kinds)


def check_image(file: Path, where: str) -> Path:
    """The image file exists and its header decodes (a full decode happens when it is used, and a failure there is
    reported the same way)."""
    if not file.is_file():
        raise ValueError(f"{where}: image {str(file)!r} not found")
    try:
        with Image.open(file) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: image {str(file)!r} is not a readable image ({e})") from None
    return file
