"""COCO-captions files ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}) as Examples."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tasks.base import Example
from tasks.errors import InputError

CAPTION_PROMPT = "describe the image"


def load_coco_captions(path: Path, images: Path, limit: int | None = None,
                       prompt: str = CAPTION_PROMPT) -> list[Example]:
    path, images = Path(path), Path(images)
    if not path.is_file():
        raise InputError(f"{path}: captions file not found")
    if not images.is_dir():
        raise InputError(f"{images}: image directory not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: top level is {type(data).__name__}; expected an object with images, annotations")
    for field in ("images", "annotations"):
        if not isinstance(data.get(field), list):
            raise InputError(f"{path}: field '{field}' is {data.get(field)!r:.60}; expected a list")
    files = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise InputError(f"{path}: images[{i}] is {im!r:.80}; expected {{'id', 'file_name'}}")
        files[im["id"]] = im["file_name"]
    refs: dict = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise InputError(f"{path}: annotations[{i}].caption is {a!r:.80}; expected a string")
        if a.get("image_id") not in files:
            raise InputError(f"{path}: annotations[{i}].image_id is {a.get('image_id')!r}; no image has that id")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    if not refs:
        raise InputError(f"{path}: field 'annotations' holds no captions")
    out = []
    for image_id in list(refs)[:limit]:
        f = images / files[image_id]
        if not f.is_file():
            raise InputError(f"{path}: image {files[image_id]!r} (id {image_id!r}) not found in {images}")
        with Image.open(f) as im:
            img = im.convert("RGB")
        out.append(Example(img, prompt, refs[image_id][0], refs=tuple(refs[image_id])))
    return out
