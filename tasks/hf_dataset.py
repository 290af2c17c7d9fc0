"""Hugging Face `datasets` on local disk: a `save_to_disk` directory, parquet files, or an imagefolder (images with a
metadata.jsonl / metadata.csv holding the other columns). Nothing is fetched: only local paths are accepted."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from .base import Example

COLUMNS = {"image": "image", "question": "question", "answer": "answer"}


def _open(path: Path, where: str):
    import datasets

    if not path.exists():
        raise ValueError(f"{where}.path: {str(path)!r} not found")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return datasets.load_from_disk(str(path))
        parquet = [path] if path.suffix == ".parquet" else sorted(path.glob("**/*.parquet")) if path.is_dir() else []
        if parquet:
            return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as e:  # datasets raises many kinds; the user needs the file and the reason
        raise ValueError(f"{where}.path: {str(path)!r} could not be read as a dataset "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise ValueError(f"{where}.path: {str(path)!r} is not a save_to_disk dir, parquet file(s) or an imagefolder")


def _image(value, root: Path, where: str) -> Image.Image:
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        value = Path(value) if Path(value).is_absolute() else root / value
        if not value.is_file():
            raise ValueError(f"{where}: image {str(value)!r} not found")
    elif not isinstance(value, Image.Image) and not (isinstance(value, dict) and value.get("bytes")):
        raise ValueError(f"{where}: the image is {value!r:.60}; expected an image, {{bytes}} or a file path")
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        with Image.open(value) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where}: the image is not a readable image ({e})") from None


def load(path: Path, split: str | None, columns: dict, where: str, limit: int | None = None) -> list[Example]:
    ds = _open(Path(path), where)
    if hasattr(ds, "keys"):  # a DatasetDict
        if split is None or split not in ds:
            raise ValueError(f"{where}.split is {split!r}; {path} has splits {', '.join(ds.keys())}")
        ds = ds[split]
    cols = {**COLUMNS, **(columns or {})}
    for role, name in cols.items():
        if name not in ds.column_names:
            raise ValueError(f"{where}: column {name!r} (columns.{role}) is not in {path}; it has "
                             f"{', '.join(ds.column_names)}")
    out = []
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        row = ds[i]
        at = f"{where}: {path} row {i}"
        q, a = row[cols["question"]], row[cols["answer"]]
        for role, v in (("question", q), ("answer", a)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{at}: column {cols[role]!r} is {v!r:.60}; expected a non-empty string")
        img = row[cols["image"]]
        out.append(Example(None if img is None else _image(img, root, at), q, a))
    return out
