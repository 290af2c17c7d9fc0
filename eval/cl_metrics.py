"""Continual-learning summary metrics, exactly as DESIGN.md defines them.

R is the (T+1) x T score matrix: row 0 before any task, row i after task i; column j is task j (0-based here, the
formulas below use 1-based task indices as in the design card).
"""
from __future__ import annotations

from typing import Sequence


def _check(R: Sequence[Sequence[float]]) -> int:
    T = len(R[0]) if R else 0
    if T == 0 or len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"score matrix must be (T+1) x T with T >= 1; got {len(R)} rows of "
                         f"{sorted({len(r) for r in R})} columns")
    return T


def op(R) -> float:
    """Overall performance: mean_j R[T][j]."""
    T = _check(R)
    return sum(R[T]) / T


def bwt(R) -> float:
    """Backward transfer: mean_{j<T} (R[T][j] - R[j][j]); 0 for a single task."""
    T = _check(R)
    if T == 1:
        return 0.0
    return sum(R[T][j - 1] - R[j][j - 1] for j in range(1, T)) / (T - 1)


def fwt(R) -> float:
    """Forward transfer: mean_{j>1} (R[j-1][j] - R[0][j]); 0 for a single task."""
    T = _check(R)
    if T == 1:
        return 0.0
    return sum(R[j - 1][j - 1] - R[0][j - 1] for j in range(2, T + 1)) / (T - 1)


def caption_retention(before: dict, after: list[dict], key: str = "CIDEr") -> float:
    """CIDEr after the last task over CIDEr before any task."""
    if not after:
        raise ValueError("caption retention needs at least one stage after a task")
    return after[-1][key] / before[key] if before[key] > 0 else 0.0


def unseen_retention(before: dict, after: list[dict], key: str = "CIDEr") -> float | None:
    """The mean over the unseen caption prompts (general["unseen_prompts"]) of each one's CIDEr after the last task
    over before; None where none was asked."""
    b, a = before.get("unseen_prompts") or {}, (after[-1].get("unseen_prompts") or {}) if after else {}
    ratios = [a[p][key] / b[p][key] if b[p][key] > 0 else 0.0 for p in b if p in a]
    return sum(ratios) / len(ratios) if ratios else None


def summary(R, general_before: dict, general_after: list[dict], lead: tuple = ()) -> dict:
    """OP, BWT, FWT and caption retention; with the general set's other measures where they were taken: caption
    retention averaged over the unseen prompts, general-VQA retention, and the same over the questions asked in
    unseen phrasings (each: after the last task over before)."""
    out = {"OP": op(R), "BWT": bwt(R), "FWT": fwt(R),
           "caption_retention": caption_retention(general_before, general_after)}
    unseen = unseen_retention(general_before, general_after)
    if unseen is not None:
        out["caption_retention_unseen"] = unseen
    if lead:
        out["caption_retention_by_metric"] = {k: caption_retention(general_before, general_after, k)
                                              for k in dict.fromkeys([*lead, "CIDEr"])}
    for key, name in (("VQA", "vqa_retention"), ("VQA_unseen", "vqa_retention_unseen")):
        if general_before.get(key) and key in general_after[-1]:
            out[name] = general_after[-1][key] / general_before[key]
    return out
