"""Task sequence YAML -> the tasks (train / test Examples) and the general held-out set, validated."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import coco, hf_dataset, llava_json, vqa_v2, world
from .base import METRICS, Example

SEQUENCE_DIR = Path(__file__).resolve().parent.parent / "configs" / "sequences"
FORMATS = ("world", "llava-json", "vqa-v2", "hf-dataset")
GENERAL_FORMATS = ("world", "coco-captions", "karpathy")
# how the evaluation generates (general.<key> in the YAML, or the CLI flag of the same name)
GENERATION_DEFAULTS = {"caption_prompt": "describe the image", "caption_max_new_tokens": 24,
                       "answer_max_new_tokens": 8}
# each format's split keys (required, optional); paths are relative to the sequence YAML
SPLIT_KEYS = {"llava-json": (("data",), ("images", "limit")),
              "vqa-v2": (("questions", "annotations", "images"), ("limit", "sample")),
              "hf-dataset": (("path",), ("split", "limit"))}
GENERAL_KEYS = {"world": ("captions", "vqa"), "coco-captions": ("data", "images", "limit"),
                "karpathy": ("data", "images", "split", "limit")}
# every general format may name caption prompts that no method is given (the world's are world.UNSEEN_CAPTION_PROMPTS)
UNSEEN_KEY = "unseen_prompts"
TASK_KEYS = {"name", "format", "train", "test", "metric", "question_types", "columns"}
TOP_KEYS = {"tasks", "world", "general", "train", "paths", "orders"}
# `paths: data-root`: the file's paths are relative to --data-root DIR (or $PIECE_MM_DATA_ROOT), not to the file, so
# that a recipe (configs/sequences/paper-vqav2.yaml) names the official downloads' own layout
DATA_ROOT_ENV = "PIECE_MM_DATA_ROOT"
# the sequence's train: section, the CLI's defaults: {key: (kind, check, what it must be)}
TRAIN_KEYS = {"steps": (int, lambda v: v > 0, "a positive integer"),
              "batch_size": (int, lambda v: v > 0, "a positive integer"),
              "lr": (float, lambda v: v > 0, "a positive number"),
              "epochs": (float, lambda v: v > 0, "a positive number"),
              "warmup": (float, lambda v: 0 <= v < 1, "a number >= 0 and < 1 (the share of a task's steps)"),
              "budget": (str, lambda v: bool(v.strip()), "a budget name or YAML")}
LEAD_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")  # eval.captioning's


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    metric: str = "exact"  # a key of tasks.base.METRICS


@dataclass
class Sequence:
    path: Path
    tasks: list[Task]
    captions: list[Example]  # general captioning, held out
    vqa: list[Example]  # general VQA, held out (the built-in world only)
    train: dict = field(default_factory=dict)  # CLI defaults: steps, batch_size, lr
    general_format: str = "world"
    corenlp: Path | None = None  # Stanford CoreNLP 3.6.0 jars for SPICE (general.corenlp)
    generation: dict = field(default_factory=lambda: dict(GENERATION_DEFAULTS))  # prompts and new-token limits
    # the general captions are also asked under these prompts, which no method is given (world.py says why)
    unseen_prompts: tuple = ()
    vqa_unseen: tuple = ()  # per general-VQA example: asked in a phrasing no method is given
    lead_metrics: tuple = ()  # caption metrics whose retention report.md leads with (general.lead_metrics)
    data_root: Path | None = None  # what the paths are relative to, for a `paths: data-root` file


def split_order(name: str | Path) -> tuple[str | Path, str | None]:
    """("world-shared", "reverse") from "world-shared@reverse"; a name without "@" (or an existing file whose name
    has one) has no order."""
    if isinstance(name, Path) or Path(name).is_file() or "@" not in str(name):
        return name, None
    stem, order = str(name).rsplit("@", 1)
    return stem, order


def task_order(path: Path, cfg: dict, order: str | None, n: int) -> list[int]:
    """The tasks' indices in the order asked for: "default" (the file's), "reverse", or "random-K", the K-th of the
    orders drawn by random.Random(orders.seed), each a shuffle unlike the default, the reverse and the earlier
    draws (the seed is written in the file before any run, so the orders are fixed with the sequence)."""
    default = list(range(n))
    if order in (None, "default"):
        return default
    if order == "reverse":
        return default[::-1]
    k = order.removeprefix("random-")
    if not order.startswith("random-") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"{path}: order {order!r}; expected default, reverse or random-K (K >= 1)")
    seed = (cfg.get("orders") or {}).get("seed") if isinstance(cfg.get("orders"), dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path}: order {order!r} needs an integer orders.seed in the file; it has {seed!r}")
    if n < 4:
        raise ValueError(f"{path}: order {order!r}: {n} tasks have too few orders to draw from")
    rng, drawn = random.Random(seed), [default, default[::-1]]
    while len(drawn) < int(k) + 2:
        perm = rng.sample(default, n)
        if perm not in drawn:
            drawn.append(perm)
    return drawn[-1]


def resolve_path(name: str | Path) -> Path:
    """A YAML path, or the stem of a file in configs/sequences ("world"); a trailing "@order" is left out."""
    name = split_order(name)[0]
    p = Path(name)
    if p.is_file():
        return p
    q = SEQUENCE_DIR / f"{name}.yaml"
    if q.is_file():
        return q
    raise ValueError(f"--tasks {str(name)!r}: sequence file not found")


def resolve_root(path: Path, cfg: dict, data_root) -> tuple[Path, Path | None]:
    """(what the file's paths are relative to, the data root if it uses one). A `paths: data-root` file needs
    `data_root` (the --data-root flag) or $PIECE_MM_DATA_ROOT; any other file's paths are relative to itself, and a
    data root given for it is refused rather than ignored."""
    import os
    mode = cfg.get("paths", "file")
    if mode not in ("file", "data-root"):
        raise ValueError(f"{path}: field 'paths' is {mode!r}; expected data-root (paths relative to --data-root) or "
                         "file (relative to this file, the default)")
    if mode == "file":
        if data_root is not None:
            raise ValueError(f"--data-root {str(data_root)!r}: {path} has its paths relative to itself (it has no "
                             "'paths: data-root')")
        return path.parent, None
    given = "--data-root"
    if data_root is None and os.environ.get(DATA_ROOT_ENV):
        data_root, given = os.environ[DATA_ROOT_ENV], f"${DATA_ROOT_ENV}"
    if data_root is None:
        raise ValueError(f"{path}: its paths are relative to a data root; give --data-root DIR (or set "
                         f"{DATA_ROOT_ENV}), the directory that holds vqav2/, coco/ and flickr30k/ (docs/paper.md)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{given} {str(data_root)!r}: directory not found")
    return root, root


def load_sequence(name: str | Path, seed: int = 0, data_root: str | Path | None = None) -> Sequence:
    path = resolve_path(name)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), list) or not cfg["tasks"]:
        raise ValueError(f"{path}: field 'tasks' must be a non-empty list")
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
    root, data_root = resolve_root(path, cfg, data_root)
    order = task_order(path, cfg, split_order(name)[1], len(cfg["tasks"]))
    w = cfg.get("world") or {}
    n_train, n_test = _positive(path, "world.train_examples", w.get("train_examples", 1000)), \
        _positive(path, "world.test_examples", w.get("test_examples", 200))
    tasks, names = [], set()
    for i, t in enumerate(cfg["tasks"]):
        at = f"{path}: tasks[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ValueError(f"{at} is {t!r:.60}; expected a mapping with a 'name'")
        fmt = t.get("format", "world")
        if fmt not in FORMATS:
            raise ValueError(f"{at}.format is {fmt!r}; expected one of {', '.join(FORMATS)}")
        unknown = sorted(set(t) - TASK_KEYS)
        if unknown:
            raise ValueError(f"{at}: unknown field {unknown[0]!r}; known: {', '.join(sorted(TASK_KEYS))}")
        if t["name"] in names:
            raise ValueError(f"{at}.name {t['name']!r} appears twice")
        names.add(t["name"])
        metric = t.get("metric", "vqa" if fmt == "vqa-v2" else "exact")
        if metric not in METRICS:
            raise ValueError(f"{at}.metric is {metric!r}; expected one of {', '.join(METRICS)}")
        if fmt == "world":
            if t["name"] not in world.TASKS and t["name"] not in world.SHARED:
                raise ValueError(f"{at}.name is {t['name']!r}; world tasks are "
                                 f"{', '.join(sorted([*world.TASKS, *world.SHARED]))}")
            train, test = (world.task_set(t["name"], "train", n_train, seed), world.task_set(t["name"], "test", n_test))
        else:
            train, test = (_load_split(fmt, t, s, root, at) for s in ("train", "test"))
        tasks.append(Task(t["name"], train, test, metric))
    tasks = [tasks[i] for i in order]
    g = cfg.get("general") or {"format": "world"}
    if not isinstance(g, dict):
        raise ValueError(f"{path}: field 'general' is {g!r:.60}; expected a mapping")
    gfmt = g.get("format", "world")
    common = ("format", "corenlp", UNSEEN_KEY, "lead_metrics", *GENERATION_DEFAULTS)
    unknown = sorted(set(g) - set(common) - set(GENERAL_KEYS.get(gfmt, ())))
    if gfmt in GENERAL_KEYS and unknown:
        raise ValueError(f"{path}: general: unknown field {unknown[0]!r} for format {gfmt}; known: "
                         f"{', '.join(common + GENERAL_KEYS[gfmt])}")
    generation = dict(GENERATION_DEFAULTS)
    for key in GENERATION_DEFAULTS:
        if key in g:
            generation[key] = check_generation(key, g[key], f"{path}: general.{key}")
    if gfmt not in GENERAL_FORMATS:
        raise ValueError(f"{path}: general.format is {gfmt!r}; expected one of {', '.join(GENERAL_FORMATS)}")
    if gfmt == "world":
        captions = world.caption_set(world.HELDOUT_CAPTION_SEED, _positive(path, "general.captions",
                                                                           g.get("captions", 100)),
                                     prompt=generation["caption_prompt"])
        vqa = world.general_vqa_set(world.HELDOUT_VQA_SEED, _positive(path, "general.vqa", g.get("vqa", 200),
                                                                      zero=True))
    else:
        at = f"{path}: general"
        data, images = (_file(root, _required(at, g, k), f"{at}.{k}") for k in ("data", "images"))
        limit = _limit(at, g)
        if gfmt == "coco-captions":
            captions = coco.load_coco_captions(data, images, limit=limit, prompt=generation["caption_prompt"])
        else:
            split = g.get("split", "test")
            captions = coco.load_karpathy(data, images, split=str(split), limit=limit,
                                          prompt=generation["caption_prompt"])
        vqa = []
    corenlp = g.get("corenlp")
    if corenlp is not None:
        corenlp = _file(root, corenlp, f"{path}: general.corenlp")
    train = cfg.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError(f"{path}: field 'train' is {train!r:.60}; expected a mapping")
    train = dict(train)
    for key, value in train.items():
        if key not in TRAIN_KEYS:
            raise ValueError(f"{path}: train: unknown field {key!r}; known: {', '.join(TRAIN_KEYS)}")
        kind, ok, what = TRAIN_KEYS[key]
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = train[key] = float(value)
            except ValueError:
                pass
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        good = isinstance(value, str) if kind is str else number and (kind is float or isinstance(value, int))
        if not good or not ok(value):
            raise ValueError(f"{path}: train.{key} is {value!r}; expected {what}")
    lead = g.get("lead_metrics", [])
    if not isinstance(lead, list) or not all(k in LEAD_KEYS for k in lead):
        raise ValueError(f"{path}: general.lead_metrics is {lead!r:.80}; expected a list of {', '.join(LEAD_KEYS)}")
    if UNSEEN_KEY in g:
        unseen = g[UNSEEN_KEY]
        if not isinstance(unseen, list) or not all(isinstance(p, str) and p.strip() for p in unseen):
            raise ValueError(f"{path}: general.{UNSEEN_KEY} is {unseen!r:.60}; expected a list of prompts")
    else:
        unseen = world.UNSEEN_CAPTION_PROMPTS if gfmt == "world" else ()
    seen = sorted({ex.prompt for t in tasks for ex in t.train} & set(unseen))
    if seen:
        raise ValueError(f"{path}: general.{UNSEEN_KEY}: {seen[0]!r} is a task's prompt, so a method is given it")
    vqa_unseen = tuple(world.unseen_question(ex.prompt) for ex in vqa)
    return Sequence(path, tasks, captions, vqa, train, gfmt, corenlp, generation,
                    _unseen(unseen, generation["caption_prompt"]), vqa_unseen, tuple(dict.fromkeys(lead)), data_root)


def _unseen(prompts, caption_prompt: str) -> tuple:
    """The unseen caption prompts, less the evaluation prompt (asked already) and repeats."""
    return tuple(dict.fromkeys(p for p in prompts if p != caption_prompt))


def check_generation(key: str, value, where: str):
    """A generation setting: the caption prompt a non-empty string, a new-token limit a positive int."""
    if key == "caption_prompt":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where} is {value!r}; expected a non-empty prompt")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where} is {value!r}; expected a positive integer")
    return value


def with_generation(seq: Sequence, **overrides) -> Sequence:
    """The sequence with generation settings given on the command line (None = keep the YAML's); a new caption
    prompt is put on every general caption example."""
    import dataclasses
    gen = dict(seq.generation)
    for key, value in overrides.items():
        if value is not None:
            gen[key] = check_generation(key, value, "--" + key.replace("_", "-"))
    captions = seq.captions
    if gen["caption_prompt"] != seq.generation["caption_prompt"]:
        captions = [dataclasses.replace(ex, prompt=gen["caption_prompt"]) for ex in captions]
    return dataclasses.replace(seq, captions=captions, generation=gen,
                               unseen_prompts=_unseen(seq.unseen_prompts, gen["caption_prompt"]))


def _required(at: str, spec: dict, key: str):
    if key not in spec:
        raise ValueError(f"{at}: required field {key!r} is missing")
    return spec[key]


def _file(root: Path, value, at: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{at} is {value!r:.60}; expected a path")
    p = root / value
    if not p.exists():
        raise ValueError(f"{at}: {str(p)!r} not found")
    return p


def _limit(at: str, spec: dict) -> int | None:
    v = spec.get("limit")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ValueError(f"{at}.limit is {v!r}; expected a positive integer")
    return v


def _load_split(fmt: str, t: dict, split: str, root: Path, at: str) -> list[Example]:
    spec = _required(at, t, split)
    at = f"{at}.{split}"
    if not isinstance(spec, dict):
        raise ValueError(f"{at} is {spec!r:.60}; expected a mapping")
    required, optional = SPLIT_KEYS[fmt]
    unknown = sorted(set(spec) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{at}: unknown field {unknown[0]!r}; known: {', '.join(required + optional)}")
    p = {k: _file(root, _required(at, spec, k), f"{at}.{k}") for k in required}
    limit = _limit(at, spec)
    sample = spec.get("sample")
    if sample is not None:
        if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
            raise ValueError(f"{at}.sample is {sample!r}; expected a positive integer")
        if limit is not None:
            raise ValueError(f"{at}: give limit (the first N) or sample (N drawn at random), not both")
    if fmt == "llava-json":
        images = _file(root, spec["images"], f"{at}.images") if "images" in spec else None
        out = llava_json.load(p["data"], images, limit)
    elif fmt == "vqa-v2":
        types = vqa_v2.resolve_types(t.get("question_types"), at.rsplit(".", 1)[0])
        out = vqa_v2.load(p["questions"], p["annotations"], p["images"], types, at, limit, sample)
    else:
        columns = t.get("columns") or {}
        if not isinstance(columns, dict) or set(columns) - set(hf_dataset.COLUMNS):
            raise ValueError(f"{at.rsplit('.', 1)[0]}.columns is {columns!r:.80}; expected a mapping over "
                             f"{', '.join(hf_dataset.COLUMNS)}")
        split_name = spec.get("split")
        out = hf_dataset.load(p["path"], None if split_name is None else str(split_name), columns, at, limit)
    if not out:
        raise ValueError(f"{at}: the split is empty (no examples" + (" of the chosen question_types"
                                                                     if fmt == "vqa-v2" else "") + ")")
    return out


def _positive(path, field_name, value, zero=False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise ValueError(f"{path}: field '{field_name}' is {value!r}; expected an integer >= {0 if zero else 1}")
    return value
