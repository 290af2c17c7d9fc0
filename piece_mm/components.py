"""Split a VLM's parameters into the three components that get separate budgets: vision, projector, llm."""
from __future__ import annotations

import re

from piece_mm.errors import InputError

COMPONENTS = ("vision", "projector", "llm")

# First match wins, so the projector rules come before the broader vision ones (Qwen's merger lives in `visual`).
# Both the transformers>=4.52 layout (model.vision_tower, model.language_model) and the older one
# (vision_tower, language_model.model, language_model.lm_head) match.
FAMILY_RULES: list[tuple[str, str]] = [
    (r"(^|\.)multi_modal_projector\.", "projector"),    # LLaVA, LLaVA-NeXT, LLaVA-OneVision
    (r"(^|\.)image_newline$", "projector"),              # LLaVA-NeXT / OneVision: learned row separator fed to the LLM
    (r"(^|\.)visual\.merger\.", "projector"),            # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    (r"(^|\.)visual\.deepstack_merger_list\.", "projector"),  # Qwen3-VL: extra mergers into early LLM layers
    (r"(^|\.)vision_tower\.", "vision"),
    (r"(^|\.)visual\.", "vision"),
    (r"(^|\.)language_model\.", "llm"),
    (r"(^|\.)lm_head\.", "llm"),
]

# PIECE leaves token embeddings out: their rows for template words soak up the budget and break unrelated outputs.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"embed_tokens\.",)


def split_components(model, exclude=DEFAULT_EXCLUDE, rules: dict | list | None = None) -> dict[str, list[str]]:
    """{"vision": [param names], "projector": [...], "llm": [...]} in the model's parameter order.

    exclude: regexes (re.search) of names left out of every component (token embeddings by default).
    rules: extra {regex: component} (or [(regex, component)]) tried before the built-in families, for models the
    built-in rules do not know. A parameter matched by nothing raises InputError naming it."""
    extra = list(rules.items()) if isinstance(rules, dict) else list(rules or [])
    for pattern, comp in extra:
        if comp not in COMPONENTS:
            raise InputError(f"component rule {pattern!r}: component is {comp!r}; expected one of "
                             f"{', '.join(COMPONENTS)}")
    compiled = [(re.compile(p), c) for p, c in extra + FAMILY_RULES]
    skip = [re.compile(p) for p in exclude or ()]
    parts: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for name, _ in model.named_parameters():
        if any(s.search(name) for s in skip):
            continue
        comp = next((c for rx, c in compiled if rx.search(name)), None)
        if comp is None:
            raise InputError(f"parameter {name!r}: no component rule matches it; map it with a 'components' "
                             "entry in the budget YAML ({regex: vision|projector|llm}) or exclude it")
        parts[comp].append(name)
    return parts


_LAYER = re.compile(r"\.(?:layers|blocks|layer|h)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The block index in a parameter name ("3"), or "other" (embeddings, norms, heads, projector)."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"
