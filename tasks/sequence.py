"""Task sequence YAML -> the tasks (train / test Examples) and the general held-out set, validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks import world
from tasks.base import Example
from tasks.errors import InputError

SEQUENCE_DIR = Path(__file__).resolve().parent.parent / "configs" / "sequences"
FORMATS = ("world",)


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    metric: str = "exact"


@dataclass
class Sequence:
    path: Path
    tasks: list[Task]
    captions: list[Example]  # general captioning, held out
    vqa: list[Example]  # general VQA, held out
    train: dict = field(default_factory=dict)  # CLI defaults: steps, batch_size, lr


def resolve_path(name: str | Path) -> Path:
    """A YAML path, or the stem of a file in configs/sequences ("world")."""
    p = Path(name)
    if p.is_file():
        return p
    q = SEQUENCE_DIR / f"{name}.yaml"
    if q.is_file():
        return q
    raise InputError(f"--tasks {str(name)!r}: sequence file not found")


def load_sequence(name: str | Path, seed: int = 0) -> Sequence:
    path = resolve_path(name)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), list) or not cfg["tasks"]:
        raise InputError(f"{path}: field 'tasks' must be a non-empty list")
    w = cfg.get("world") or {}
    n_train, n_test = _positive(path, "world.train_examples", w.get("train_examples", 1000)), \
        _positive(path, "world.test_examples", w.get("test_examples", 200))
    tasks, names = [], set()
    for i, t in enumerate(cfg["tasks"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InputError(f"{path}: tasks[{i}] is {t!r:.60}; expected a mapping with a 'name'")
        fmt = t.get("format", "world")
        if fmt not in FORMATS:
            raise InputError(f"{path}: tasks[{i}].format is {fmt!r}; expected one of {', '.join(FORMATS)}")
        if t["name"] in names:
            raise InputError(f"{path}: tasks[{i}].name {t['name']!r} appears twice")
        names.add(t["name"])
        if t["name"] not in world.TASKS:
            raise InputError(f"{path}: tasks[{i}].name is {t['name']!r}; world tasks are "
                             f"{', '.join(sorted(world.TASKS))}")
        tasks.append(Task(t["name"], world.task_set(t["name"], "train", n_train, seed),
                          world.task_set(t["name"], "test", n_test), t.get("metric", "exact")))
    g = cfg.get("general") or {"format": "world"}
    if g.get("format", "world") != "world":
        raise InputError(f"{path}: general.format is {g.get('format')!r}; expected one of {', '.join(FORMATS)}")
    captions = world.caption_set(world.HELDOUT_CAPTION_SEED, _positive(path, "general.captions", g.get("captions", 100)),
                                 prompt=world.CAPTION_EVAL_PROMPT)
    vqa = world.general_vqa_set(world.HELDOUT_VQA_SEED, _positive(path, "general.vqa", g.get("vqa", 200), zero=True))
    train = cfg.get("train") or {}
    if not isinstance(train, dict):
        raise InputError(f"{path}: field 'train' is {train!r:.60}; expected a mapping")
    return Sequence(path, tasks, captions, vqa, train)


def _positive(path, field_name, value, zero=False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise InputError(f"{path}: field '{field_name}' is {value!r}; expected an integer >= {0 if zero else 1}")
    return value
