"""`pm.Budget`: the typed form of a budget YAML (configs/budgets/*.yaml), in the manner of peft's LoraConfig.

    budget = pm.Budget(fractions={"llm": 0.01}, exclude=[r"embed_tokens\\.", r"language_model\\..*\\.k_proj\\."])
    budget = pm.Budget.from_yaml("default")           # a path, or a name in configs/budgets
    masks = pm.select_masks(scores, parts, budget)    # its fractions (or total), pool and granularity

It is validated where it is made, once: every error names the file (or "Budget"), the field and the value. The loop
and metrics.json hold its plain form, `to_dict()`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from piece_mm.components import COMPONENTS
from piece_mm.configs import DIR as CONFIGS
from piece_mm.errors import InputError

BUDGET_DIR = CONFIGS / "budgets"
GRANULARITIES = ("element", "tensor")
POOLS = ("component", "global", "auto")
SCORE_MEMORY = ("auto", "device", "host")
# method="trace" options (piece_mm/importance/trace.py); probe_steps None = a tenth of the task's training steps
TRACE_DEFAULTS = {"probe_steps": None, "probe_lr": 1.0e-4, "level": "element", "mix": 0.5, "specificity": "weight",
                  "strength": 1.0, "threshold": 0.5}
# the sparse methods' guard against forgetting: weight x T^2 x KL(teacher || student) at temperature T, where the
# teacher is the model as the task began (piece_mm/methods/piece.py); weight 0 = off. The teacher runs once per example
# before the task's first step and its top_k log-probabilities per text position are cached (regularise.py; null = the
# whole vocabulary, the exact term) in cache_dir (null: <output>/distill), where a resumed task reads them back;
# image_positions: also hold the positions of the image placeholders.
DISTILL_DEFAULTS = {"weight": 0.0, "temperature": 2.0, "answers": True, "top_k": 32, "image_positions": False,
                    "cache_dir": None, "held": {}}
# distill.held: the same term on prompts the task does not show (piece_mm/methods/held.py): the task's images asked
# the bank's prompts and the earlier tasks' prompts (strings only), answered by the model as the task began; weight 0
# = off. pool: such examples made per task; per_step: of them beside each step's batch; earlier: prompts taken from
# each earlier task; earlier_share: their share of the pool (when there are any); max_new_tokens: the longest answer
# held; protect: how much a weight's own importance to the held examples counts against choosing it (0 = not at all;
# piece_mm/methods/held.py, protect_scores); earlier_form: an earlier task's prompt is answered among that task's own
# answers and held over their tokens (methods/held.py); crops: the share of the held rows asked about a crop of the
# picture (35-65 % of each side, scaled back), so that the term also holds pictures unlike the task's own;
# bank_teacher: who answers the bank's prompts and is held there: "task" (the model as the task began) or "base" (the
# model before the first task: the base values of the elements earlier tasks chose, put back while it answers; the
# earlier tasks' prompts stay the model's as the task began), so that a drift of the general answers does not become
# the next task's teacher (methods/held.py); paraphrases: a bank prompt that the model, as the task begins, answers as
# it answers the task's own prompt on at least this share of the task's images (32 of them) is taken for a rewording
# of the task's question and not held (0 = every bank prompt is held).
HELD_DEFAULTS = {"weight": 0.0, "bank": "generic", "pool": 256, "per_step": 8, "earlier": 16, "earlier_share": 0.5,
                 "max_new_tokens": 24, "protect": 0.0, "earlier_form": False, "crops": 0.0, "bank_teacher": "task",
                 "paraphrases": 0.0}


@dataclass
class Budget:
    """Which weights the sparse methods may choose for a task, how many, and how they are tuned.

    fractions: of each component's scorable elements (k = floor(fraction x elements), >= 1 if > 0);
    pool: "component" (a top-k in each), "global" (one top-k over all, the paper's; `total` then gives its size) or
    "auto" (the same total, split among the components by their share of the task's score mass; select.py);
    exclude: regexes of parameter names never chosen; components: {regex: component} for families not known;
    score_examples, score_batch_size (1 = per-sample): the scoring pass; score_memory: where its sums live;
    lr, steps: used when the command line gives none; betas, weight_decay: AdamW's; granularity: "element" or
    "tensor" (whole tensors, as TRACE's code); trace: method="trace" options (TRACE_DEFAULTS); distill: the
    distillation term added to every task's loss, {weight, temperature} (DISTILL_DEFAULTS: off)."""
    fractions: dict = field(default_factory=lambda: {"vision": 0.0, "projector": 0.0, "llm": 0.001})
    pool: str = "component"
    total: float | None = None
    exclude: list = field(default_factory=lambda: [r"embed_tokens\."])
    components: dict = field(default_factory=dict)
    score_examples: int = 1000
    score_batch_size: int = 16
    lr: float | None = None
    steps: int | None = None
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    granularity: str = "element"
    score_memory: str = "auto"
    trace: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    keep_earlier: bool = False  # never choose a weight an earlier task of the run chose: each task's weights its own
    path: str | None = None  # the file it was read from, as shown in logs and metrics.json

    def __post_init__(self):
        where = self.path or "Budget"
        if not isinstance(self.betas, (list, tuple)):
            raise InputError(f"{where}: betas is {self.betas!r}; expected [beta1, beta2] in [0, 1)")
        self.betas = list(self.betas)
        fr = self.fractions
        if not isinstance(fr, dict) or set(fr) - set(COMPONENTS):
            raise InputError(f"{where}: fractions is {fr!r}; expected a mapping over {', '.join(COMPONENTS)}")
        for c, v in fr.items():
            if not _number(v) or not 0.0 <= v <= 1.0:
                raise InputError(f"{where}: fractions.{c} is {v!r}; expected a number in [0, 1]")
        if self.pool not in POOLS:
            raise InputError(f"{where}: pool is {self.pool!r}; expected 'component', 'global' or 'auto'")
        if self.total is not None and (not _number(self.total) or not 0.0 < self.total <= 1.0):
            raise InputError(f"{where}: total is {self.total!r}; expected a number in (0, 1]")
        if not isinstance(self.exclude, list) or not all(isinstance(x, str) for x in self.exclude):
            raise InputError(f"{where}: exclude is {self.exclude!r}; expected a list of regexes")
        if not isinstance(self.components, dict) or any(v not in COMPONENTS for v in self.components.values()):
            raise InputError(f"{where}: components is {self.components!r}; expected {{regex: vision|projector|llm}}")
        for f in ("score_examples", "score_batch_size", "steps"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise InputError(f"{where}: {f} is {v!r}; expected a positive integer")
        if self.lr is not None and (not _number(self.lr) or self.lr <= 0):
            raise InputError(f"{where}: lr is {self.lr!r}; expected a positive number")
        if not (len(self.betas) == 2 and all(_number(x) and 0 <= x < 1 for x in self.betas)):
            raise InputError(f"{where}: betas is {self.betas!r}; expected [beta1, beta2] in [0, 1)")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            raise InputError(f"{where}: weight_decay is {self.weight_decay!r}; expected a number >= 0")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"{where}: granularity is {self.granularity!r}; expected one of "
                             f"{', '.join(GRANULARITIES)}")
        if self.score_memory not in SCORE_MEMORY:
            raise InputError(f"{where}: score_memory is {self.score_memory!r}; expected auto, device or host")
        if not isinstance(self.keep_earlier, bool):
            raise InputError(f"{where}: keep_earlier is {self.keep_earlier!r}; expected true or false")
        self.trace = _trace_options(where, self.trace)
        self.distill = _distill_options(where, self.distill)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "Budget") -> Budget:
        """From a YAML's mapping; an unknown field is an error naming it."""
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a mapping, found {type(raw).__name__}")
        known = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(known)}")
        return cls(**raw, path=where)

    @classmethod
    def from_yaml(cls, name) -> Budget:
        """A budget YAML: a path, or a stem in configs/budgets ("default", "paper-global", ...)."""
        import yaml

        path = Path(name)
        if not path.is_file():
            path = BUDGET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise InputError(f"--budget {str(name)!r}: file not found (nor {path})")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:  # shown in logs and metrics.json: relative to the working directory where it can be
            shown = str(path.resolve().relative_to(Path.cwd()))
        except ValueError:
            shown = str(path)
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a mapping, found {type(raw).__name__}")
        budget = cls.from_dict(raw, where=str(path))  # errors name the file as found
        budget.path = shown
        return budget

    def to_dict(self) -> dict:
        """The plain form the loop, the checkpoints and metrics.json hold."""
        return dataclasses.asdict(self)

    def selection(self):
        """select_masks' `budget` argument: the fractions per component, or {"total": t} for a global pool of
        a set size."""
        if self.pool in ("global", "auto") and self.total is not None:
            return {"total": self.total}
        return self.fractions


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _options(where, name: str, given, defaults: dict) -> dict:
    """A field that is a mapping of options (trace, distill): the given ones over the defaults, none unknown."""
    if not isinstance(given, dict):
        raise InputError(f"{where}: {name} is {given!r:.60}; expected a mapping of {', '.join(defaults)}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(f"{where}: {name}.{unknown[0]} is not a {name} option; known: {', '.join(defaults)}")
    return {**defaults, **given}


def _trace_options(where, t) -> dict:
    from piece_mm.importance.trace import LEVELS, SPECIFICITY_RULES

    t = _options(where, "trace", t, TRACE_DEFAULTS)
    v = t["probe_steps"]
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise InputError(f"{where}: trace.probe_steps is {v!r}; expected a positive integer")
    for f, lo, hi in (("probe_lr", 0.0, None), ("mix", 0.0, 1.0), ("strength", 0.0, None), ("threshold", -1.0, 1.0)):
        v = t[f]
        if not _number(v) or v < lo or (hi is not None and v > hi) or (f == "probe_lr" and v == 0):
            top = hi if hi is not None else "inf"
            raise InputError(f"{where}: trace.{f} is {v!r}; expected a number in [{lo}, {top}]")
    if t["level"] not in LEVELS:
        raise InputError(f"{where}: trace.level is {t['level']!r}; expected one of {', '.join(LEVELS)}")
    if t["specificity"] not in SPECIFICITY_RULES:
        raise InputError(f"{where}: trace.specificity is {t['specificity']!r}; expected one of "
                         f"{', '.join(SPECIFICITY_RULES)}")
    return t


def distill_of(budget: dict) -> dict | None:
    """A budget dict's distill options when it distils (weight > 0), else None. A dict made by hand, not through
    Budget, may lack the field: off."""
    d = budget.get("distill") or {}
    return d if d.get("weight", 0) > 0 else None


def _distill_options(where, d) -> dict:
    d = _options(where, "distill", d, DISTILL_DEFAULTS)
    if not _number(d["weight"]) or d["weight"] < 0:
        raise InputError(f"{where}: distill.weight is {d['weight']!r}; expected a number >= 0 (0 = off)")
    if not _number(d["temperature"]) or d["temperature"] <= 0:
        raise InputError(f"{where}: distill.temperature is {d['temperature']!r}; expected a number > 0")
    h = _options(where, "distill.held", d["held"], HELD_DEFAULTS)
    if not _number(h["weight"]) or h["weight"] < 0:
        raise InputError(f"{where}: distill.held.weight is {h['weight']!r}; expected a number >= 0 (0 = off)")
    if h["weight"] > 0 and d["weight"] <= 0:
        raise InputError(f"{where}: distill.held.weight is {h['weight']!r} but distill.weight is {d['weight']!r}; "
                         "the held prompts are part of the distillation term: give distill.weight > 0")
    if not isinstance(h["bank"], str) or not h["bank"]:
        raise InputError(f"{where}: distill.held.bank is {h['bank']!r}; expected a prompt bank's name or path")
    if h["weight"] > 0:  # a bank that is missing or malformed stops the run here, before anything is written
        from piece_mm.methods.held import load_bank
        try:
            load_bank(h["bank"])
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    for f in ("pool", "per_step", "earlier", "max_new_tokens"):
        v = h[f]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "earlier" else 1):
            raise InputError(f"{where}: distill.held.{f} is {v!r}; expected an integer >= "
                             f"{0 if f == 'earlier' else 1}")
    if not isinstance(d["answers"], bool):
        raise InputError(f"{where}: distill.answers is {d['answers']!r}; expected true (the term also holds the "
                         "positions that predict the task's answer) or false")
    if not _number(h["earlier_share"]) or not 0 <= h["earlier_share"] < 1:
        raise InputError(f"{where}: distill.held.earlier_share is {h['earlier_share']!r}; expected a number in [0, 1)")
    if not _number(h["crops"]) or not 0 <= h["crops"] <= 1:
        raise InputError(f"{where}: distill.held.crops is {h['crops']!r}; expected a number in [0, 1]")
    if not isinstance(h["earlier_form"], bool):
        raise InputError(f"{where}: distill.held.earlier_form is {h['earlier_form']!r}; expected true or false")
    if not _number(h["protect"]) or h["protect"] < 0:
        raise InputError(f"{where}: distill.held.protect is {h['protect']!r}; expected a number >= 0 (0 = off)")
    if not _number(h["paraphrases"]) or not 0 <= h["paraphrases"] <= 1:
        raise InputError(f"{where}: distill.held.paraphrases is {h['paraphrases']!r}; expected a number in [0, 1] "
                         "(0 = off)")
    h["paraphrases"] = float(h["paraphrases"])
    if h["bank_teacher"] not in ("task", "base"):
        raise InputError(f"{where}: distill.held.bank_teacher is {h['bank_teacher']!r}; expected task (the model as "
                         "the task began) or base (the model before the first task)")
    k = d["top_k"]
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise InputError(f"{where}: distill.top_k is {k!r}; expected an integer >= 1 (null = the whole vocabulary)")
    if not isinstance(d["image_positions"], bool):
        raise InputError(f"{where}: distill.image_positions is {d['image_positions']!r}; expected true or false")
    if d["cache_dir"] is not None and (not isinstance(d["cache_dir"], str) or not d["cache_dir"]):
        raise InputError(f"{where}: distill.cache_dir is {d['cache_dir']!r}; expected a directory (null = "
                         "<output>/distill)")
    h["weight"], h["earlier_share"], h["protect"] = float(h["weight"]), float(h["earlier_share"]), float(h["protect"])
    h["crops"] = float(h["crops"])
    return {"weight": float(d["weight"]), "temperature": float(d["temperature"]), "answers": d["answers"],
            "top_k": k, "image_positions": d["image_positions"], "cache_dir": d["cache_dir"], "held": h}


def held_of(budget: dict) -> dict | None:
    """A budget dict's distill.held options when the held prompts are on (weight > 0), else None."""
    d = distill_of(budget)
    h = (d or {}).get("held") or {}
    return h if h.get("weight", 0) > 0 else None


BUDGET_DEFAULTS = {k: v for k, v in Budget().to_dict().items() if k != "path"}  # as validated: trace, distill filled
