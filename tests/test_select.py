import math

import pytest
import torch

import piece_mm as pm
from piece_mm.select import jaccard, load_budget, mask_summary
from piece_mm.tasks.errors import InputError


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"v.layers.0.w": (7, 5), "v.layers.1.w": (9,), "p.w": (4, 4), "l.layers.0.w": (30, 11),
              "l.layers.1.w": (13,), "head.w": (6, 3)}
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


PARTS = {"vision": ["v.layers.0.w", "v.layers.1.w"], "projector": ["p.w"],
         "llm": ["l.layers.0.w", "l.layers.1.w", "head.w"]}


def test_counts_are_exact_and_the_set_is_a_top_k():
    scores = _scores()
    budget = {"vision": 0.1, "projector": 0.0001, "llm": 0.05}
    masks = pm.select_masks(scores, PARTS, budget)
    for c, names in PARTS.items():
        n = sum(scores[x].numel() for x in names)
        k = max(1, math.floor(budget[c] * n))
        chosen = [scores[x].view(-1)[masks[x]] for x in names if x in masks]
        assert sum(t.numel() for t in chosen) == k, c
        flat = torch.cat([scores[x].view(-1) for x in names])
        assert torch.cat(chosen).sort().values.equal(flat.topk(k).values.sort().values)  # exactly the top k values
    for idx in masks.values():
        assert idx.dtype == torch.int64 and idx.dim() == 1 and torch.equal(idx, idx.sort().values)
    assert all(idx.numel() for idx in masks.values())  # empty tensors are omitted
    s = mask_summary(masks, PARTS)
    assert s["total"] == sum(idx.numel() for idx in masks.values())
    assert s["llm"]["chosen"] == sum(s["llm"]["layers"].values())
    assert set(s["llm"]["layers"]) <= {"0", "1", "other"}


def test_zero_fraction_selects_nothing_and_negative_scores_work():
    scores = {n: -t for n, t in _scores(1).items()}
    masks = pm.select_masks(scores, PARTS, {"vision": 0.0, "projector": 0.0, "llm": 0.02})
    assert set(masks) <= set(PARTS["llm"])
    k = math.floor(0.02 * sum(scores[x].numel() for x in PARTS["llm"]))
    flat = torch.cat([scores[x].view(-1) for x in PARTS["llm"]])
    chosen = torch.cat([scores[x].view(-1)[masks[x]] for x in PARTS["llm"] if x in masks])
    assert chosen.sort().values.equal(flat.topk(k).values.sort().values)


def test_ties_break_by_parameter_order_then_index():
    scores = {n: torch.ones_like(t) for n, t in _scores().items()}
    m1 = pm.select_masks(scores, PARTS, {"llm": 0.5})
    m2 = pm.select_masks(scores, PARTS, {"llm": 0.5})
    assert m1.keys() == m2.keys() and all(torch.equal(m1[n], m2[n]) for n in m1)
    k = math.floor(0.5 * (330 + 13 + 18))
    assert list(m1) == ["l.layers.0.w"] and torch.equal(m1["l.layers.0.w"], torch.arange(k))


def test_global_pool_is_one_top_k_over_everything():
    scores = _scores(2)
    scores["head.w"] = scores["head.w"] * 100  # a component on a larger scale takes the whole global budget
    masks = pm.select_masks(scores, PARTS, 0.03, pool="global")
    total = sum(t.numel() for t in scores.values())
    k = math.floor(0.03 * total)
    assert sum(i.numel() for i in masks.values()) == k
    assert list(masks) == ["head.w"]
    assert pm.select_masks(scores, PARTS, {"total": 0.03}, pool="global").keys() == masks.keys()


def test_bad_budget_and_pool():
    with pytest.raises(InputError, match="budget.llm"):
        pm.select_masks(_scores(), PARTS, {"llm": 1.5})
    with pytest.raises(InputError, match="pool"):
        pm.select_masks(_scores(), PARTS, {"llm": 0.1}, pool="everywhere")


def test_jaccard():
    a = {"x": torch.tensor([0, 1, 2]), "y": torch.tensor([5])}
    b = {"x": torch.tensor([1, 2, 3])}
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, a) == 1.0


def test_shipped_budgets_load_and_bad_ones_name_the_field(tmp_path):
    for name in ("default", "llm-only", "paper-global"):
        b = load_budget(name)
        assert b["pool"] in ("component", "global")
    assert load_budget("paper-global")["pool"] == "global"
    for name in ("paper-global", "llava-1.5-7b", "llava-1.5-7b-global", "qwen-vl", "qwen-vl-global"):  # the paper's
        b = load_budget(name)
        assert b["lr"] == 1e-5 and b["betas"] == [0.9, 0.95] and b["exclude"] == ["embed"]
        assert (b["total"] if b["pool"] == "global" else max(b["fractions"].values())) == 0.001
    bad = tmp_path / "b.yaml"
    bad.write_text("fractions: {llm: 2.0}\n")
    with pytest.raises(InputError, match=r"b\.yaml: fractions\.llm is 2\.0"):
        load_budget(bad)
    bad.write_text("fractions: {llm: 0.1}\nbogus: 1\n")
    with pytest.raises(InputError, match="bogus"):
        load_budget(bad)
    with pytest.raises(InputError, match="nope"):
        load_budget(tmp_path / "nope.yaml")
