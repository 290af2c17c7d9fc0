"""Caption sets for measuring retained general ability, as Examples whose `refs` are the reference captions.

- coco-captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
- karpathy: dataset_coco.json style, {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]};
  the images of one split (default "test") are used.
"""
from __future__ import annotations

from pathlib import Path

from .base import Example
from .jsonio import check_image, field, records

CAPTION_PROMPT = "describe the image"


def _images_dir(images: Path) -> Path:
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"{images}: image directory not found")
    return images


def load_coco_captions(path: Path, images: Path, limit: int | None = None,
                       prompt: str = CAPTION_PROMPT) -> list[Example]:
    path, images = Path(path), _images_dir(images)
    data = records(path, ("images", "annotations"), "captions file")
    files = {}
    for im in data["images"]:
        files[field(path, im, "id", (int, str))] = field(path, im, "file_name", str)
    refs: dict = {}
    for a in data["annotations"]:
        caption = field(path, a, "caption", str)
        image_id = field(path, a, "image_id", (int, str))
        if image_id not in files:
            raise ValueError(f"{path}: {a.where}: field 'image_id' is {image_id!r}; no entry of 'images' has that id")
        refs.setdefault(image_id, []).append(caption)
    if not refs:
        raise ValueError(f"{path}: field 'annotations' holds no captions")
    out = []
    for image_id in list(refs)[:limit]:
        f = check_image(images / files[image_id], f"{path}: image id {image_id!r}")
        out.append(Example(f, prompt, refs[image_id][0], refs=tuple(refs[image_id])))
    return out


def load_karpathy(path: Path, images: Path, split: str = "test", limit: int | None = None,
                  prompt: str = CAPTION_PROMPT) -> list[Example]:
    path, images = Path(path), _images_dir(images)
    out = []
    for im in records(path, ("images",), "captions file")["images"]:
        if field(path, im, "split", str) != split:
            continue
        name = field(path, im, "filename", str)
        sents = field(path, im, "sentences", list, "a non-empty list of {raw}")
        caps = [s.get("raw") for s in sents if isinstance(s, dict)]
        if not caps or len(caps) != len(sents) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: {im.where}: field 'sentences' is {sents!r:.60}; expected a non-empty list of "
                             "{raw: string}")
        if len(out) == limit:
            continue
        sub = im.get("filepath", "")
        f = images / sub / name if (images / sub / name).is_file() else images / name
        out.append(Example(check_image(f, f"{path}: {im.where}"), prompt, caps[0], refs=tuple(caps)))
    if not out:
        raise ValueError(f"{path}: no image has split {split!r}")
    return out
