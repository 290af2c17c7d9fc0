"""Small data sets in each real format, written by the tests themselves (images drawn with PIL from world scenes).

make(root) writes, under root:
    images/                   PNGs named like COCO (COCO_2014_000000000001.png ...)
    llava/train.json          LLaVA conversation list: single- and multi-turn, <image> first or last, one text-only
    llava/test.jsonl
    vqa/q_{train,test}.json   VQA-v2 questions / annotations, question types of three VQACL groups
    vqa/a_{train,test}.json
    hf/                       a datasets.save_to_disk DatasetDict (train, test) with an Image column
    hf_parquet/data.parquet   the same train rows as parquet
    hf_folder/                an imagefolder (images + metadata.jsonl)
    captions.json             COCO captions {images, annotations}
    karpathy.json             dataset_coco.json style
    mixed.yaml                the sequence: llava-json, vqa-v2, hf-dataset and world tasks, coco-captions general
    mixed-karpathy.yaml       llava-json + world, karpathy general
"""
from __future__ import annotations

import json
from pathlib import Path

from piece_mm.tasks import world

N_IMAGES = 24


def _scenes():
    return world.scenes(4242, N_IMAGES)


def image_name(i: int) -> str:
    return f"COCO_2014_{i + 1:012d}.png"


def make(root: Path) -> dict:
    root = Path(root)
    scenes = _scenes()
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        s.image().save(root / "images" / image_name(i))

    # LLaVA-JSON
    (root / "llava").mkdir(exist_ok=True)
    recs = []
    for i, s in enumerate(scenes[:12]):
        convo = [{"from": "human", "value": "<image>\nwhat color are the shapes"}, {"from": "gpt", "value": s.color}]
        if i % 3 == 1:  # multi-turn, the placeholder after the text
            convo = [{"from": "human", "value": "describe the image\n<image>"}, {"from": "gpt", "value": s.phrase()},
                     {"from": "human", "value": "what color are the shapes"}, {"from": "gpt", "value": s.color}]
        recs.append({"id": f"l{i}", "image": image_name(i), "conversations": convo})
    recs.append({"id": "text-only", "conversations": [{"from": "human", "value": "what is red in spanish"},
                                                      {"from": "gpt", "value": "rojo"}]})
    (root / "llava" / "train.json").write_text(json.dumps(recs, indent=1))
    (root / "llava" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:8]))

    # VQA-v2
    (root / "vqa").mkdir(exist_ok=True)
    kinds = [("how many", "how many shapes are there", lambda s: str(s.count)),
             ("what color is the", "what color is the shape", lambda s: s.color),
             ("is there a", "is there a circle", lambda s: "yes" if s.shape == "circle" else "no")]
    for split, idx in (("train", range(0, 18)), ("test", range(12, 24))):
        qs, anns = [], []
        for i in idx:
            qtype, q, fn = kinds[i % 3]
            qid = 1000 * (i + 1) + (0 if split == "train" else 1)
            qs.append({"image_id": i + 1, "question": q, "question_id": qid})
            a = fn(scenes[i])
            answers = [a] * 7 + ["other"] * 3
            anns.append({"question_id": qid, "image_id": i + 1, "question_type": qtype, "answer_type": "other",
                         "multiple_choice_answer": a,
                         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                                     for k, x in enumerate(answers)]})
        (root / "vqa" / f"q_{split}.json").write_text(json.dumps({"questions": qs}, indent=1))
        (root / "vqa" / f"a_{split}.json").write_text(json.dumps({"annotations": anns}, indent=1))

    # HF datasets: save_to_disk, parquet, imagefolder
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string")})

    def rows(idx):
        return {"image": [scenes[i].image() for i in idx], "question": ["how many shapes are there"] * len(idx),
                "answer": [world.COUNT_WORDS[scenes[i].count] for i in idx]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(range(0, 16)), features=feats),
                               "test": datasets.Dataset.from_dict(rows(range(16, 24)), features=feats)})
    dd.save_to_disk(str(root / "hf"))
    (root / "hf_parquet").mkdir(exist_ok=True)
    dd["train"].to_parquet(str(root / "hf_parquet" / "data.parquet"))
    (root / "hf_folder" / "train").mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(8):
        scenes[i].image().save(root / "hf_folder" / "train" / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "q": "how many shapes are there",
                     "a": world.COUNT_WORDS[scenes[i].count]})
    (root / "hf_folder" / "train" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))

    # caption sets
    caps = {"images": [{"id": i + 1, "file_name": image_name(i)} for i in range(N_IMAGES)],
            "annotations": [{"image_id": i + 1, "id": 10 * i + k, "caption": c}
                            for i, s in enumerate(scenes) for k, c in enumerate(s.captions()[:3])]}
    (root / "captions.json").write_text(json.dumps(caps, indent=1))
    karp = {"images": [{"filepath": "", "filename": image_name(i), "imgid": i, "cocoid": i + 1,
                        "split": "test" if i >= 16 else "train",
                        "sentences": [{"raw": c, "tokens": c.split()} for c in s.captions()[:3]]}
                       for i, s in enumerate(scenes)], "dataset": "coco"}
    (root / "karpathy.json").write_text(json.dumps(karp, indent=1))

    tasks = """tasks:
  - name: sqa
    format: llava-json
    train: {data: llava/train.json, images: images}
    test:  {data: llava/test.jsonl, images: images}
  - name: count
    format: vqa-v2
    train: {questions: vqa/q_train.json, annotations: vqa/a_train.json, images: images}
    test:  {questions: vqa/q_test.json, annotations: vqa/a_test.json, images: images}
    question_types: [count, color]
  - name: mine
    format: hf-dataset
    train: {path: hf, split: train}
    test:  {path: hf, split: test}
    columns: {image: image, question: question, answer: answer}
  - name: color
    format: world
world: {train_examples: 48, test_examples: 16}
"""
    (root / "mixed.yaml").write_text(tasks + "general:\n  format: coco-captions\n  data: captions.json\n"
                                     "  images: images\n")
    (root / "mixed-karpathy.yaml").write_text(
        "tasks:\n" + tasks.split("tasks:\n")[1].split("  - name: count")[0] + "  - {name: color, format: world}\n"
        "world: {train_examples: 48, test_examples: 16}\n"
        "general: {format: karpathy, data: karpathy.json, images: images}\n")
    return {"root": root, "scenes": scenes}
