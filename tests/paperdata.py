"""A data root in exactly the official downloads' formats and file names, drawn from the built-in world, small
enough for CI: what `--data-root` expects for configs/sequences/paper-vqav2.yaml and vqacl-10.yaml (docs/paper.md).

    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json   {"info", "task_type", "data_type", "data_subtype",
                                                                "questions": [{image_id, question, question_id}]}
    vqav2/v2_mscoco_{train,val}2014_annotations.json           {"info", ..., "annotations": [{question_type,
                                                                multiple_choice_answer, answers: [10 x {answer,
                                                                answer_confidence, answer_id}], image_id,
                                                                answer_type, question_id}]}
    coco/{train,val}2014/COCO_{train,val}2014_<12-digit id>.jpg
    flickr30k/dataset_flickr30k.json                           Karpathy's split file
    flickr30k/flickr30k-images/<id>.jpg

Every VQACL group gets questions of one of its own question types (configs/vqacl_groups.yaml), asked about world
scenes, so both recipes run end to end on the tiny models:

    python -m tests.paperdata /tmp/paper-fixture
    python -m piece_mm.train --model llava --tasks paper-vqav2 --data-root /tmp/paper-fixture
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from piece_mm.tasks import world

# VQACL group -> (a question_type of that group, the question, the answer from a scene)
QUESTIONS = {
    "recognition": ("what is", "what is in the picture", lambda s: s.shape),
    "location": ("where is the", "where is the shape", lambda s: s.position),
    "judge": ("is there a", "is there a circle", lambda s: "yes" if s.shape == "circle" else "no"),
    "commonsense": ("how", "how big is the shape", lambda s: s.size),
    "count": ("how many", "how many shapes are there", lambda s: world.COUNT_WORDS[s.count]),
    "action": ("what is the person", "what is the person looking at", lambda s: s.shape),
    "color": ("what color is the", "what color is the shape", lambda s: s.color),
    "type": ("what kind of", "what kind of shape is this", lambda s: s.shape),
    "subcategory": ("which", "which color do you see", lambda s: s.color),
    "causal": ("why", "why is the shape there", lambda s: s.position),
}
PER_IMAGE = 1  # questions per image and group
SIZES = {"train": 24, "val": 8}  # images per split: train2014 feeds training, val2014 the tests
FLICKR = 8  # test images of the Flickr30k split file (plus as many train ones, which no recipe reads)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make(root: Path) -> Path:
    """Write the data root under `root`; returns it."""
    root = Path(root)
    qid = 1
    for split, seed in (("train", 2014), ("val", 2015)):
        scenes = world.scenes(seed, SIZES[split])
        images = root / "coco" / f"{split}2014"
        images.mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i, s in enumerate(scenes):
            image_id = 1000 * (1 if split == "train" else 2) + i  # COCO ids are not dense: leave gaps
            s.image().save(images / f"COCO_{split}2014_{image_id:012d}.jpg", quality=95)
            for qtype, question, answer in QUESTIONS.values():
                a = answer(s)
                answers = [a] * 8 + ["other", "maybe"]
                questions.append({"image_id": image_id, "question": question + "?", "question_id": qid})
                annotations.append({"question_type": qtype, "multiple_choice_answer": a, "image_id": image_id,
                                    "answer_type": "yes/no" if a in ("yes", "no") else "other", "question_id": qid,
                                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                                                for k, x in enumerate(answers)]})
                qid += 1
        info = {"description": "piece_mm test fixture in the VQA-v2 format", "version": "2.0"}
        _write_json(root / "vqav2" / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
                    {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                     "data_subtype": f"{split}2014", "questions": questions})
        _write_json(root / "vqav2" / f"v2_mscoco_{split}2014_annotations.json",
                    {"info": info, "license": {}, "data_subtype": f"{split}2014", "annotations": annotations})
    flickr = root / "flickr30k"
    (flickr / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, s in enumerate(world.scenes(3030, 2 * FLICKR)):
        name = f"{100000 + i}.jpg"
        s.image().save(flickr / "flickr30k-images" / name, quality=95)
        caps = s.captions()[:5]
        entries.append({"sentids": list(range(5 * i, 5 * i + len(caps))), "imgid": i, "split":
                        "test" if i < FLICKR else "train", "filename": name,
                        "sentences": [{"tokens": c.split(), "raw": c, "imgid": i, "sentid": 5 * i + k}
                                      for k, c in enumerate(caps)]})
    _write_json(flickr / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.paperdata DIR")
    print(make(Path(sys.argv[1])))
