import math

import pytest
import torch

import piece_mm as pm
from piece_mm.errors import InputError
from piece_mm.select import jaccard, load_budget, mask_summary


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


def test_auto_pool_splits_the_total_by_score_mass():
    scores = _scores(3)
    scores["head.w"] = scores["head.w"] * 10  # a larger scale: the global pool gives this tensor most of its k
    total = sum(t.numel() for t in scores.values())
    k = math.floor(0.1 * total)
    masks = pm.select_masks(scores, PARTS, 0.1, pool="auto")
    glob = pm.select_masks(scores, PARTS, 0.1, pool="global")
    mass = {c: sum(float(scores[n].double().sum()) for n in names) for c, names in PARTS.items()}
    got = {c: sum(masks[n].numel() for n in names if n in masks) for c, names in PARTS.items()}
    assert sum(got.values()) == k
    for c in PARTS:  # k_c is k x the component's share of the mass, rounded (largest remainders)
        assert abs(got[c] - k * mass[c] / sum(mass.values())) < 1 and got[c] > 0, (c, got)
        flat = torch.cat([scores[x].view(-1) for x in PARTS[c]])
        chosen = [scores[x].view(-1)[masks[x]] for x in PARTS[c] if x in masks]
        assert torch.cat(chosen).sort().values.equal(flat.topk(got[c]).values.sort().values)  # a top-k in each
    assert {c: sum(glob[n].numel() for n in names if n in glob) for c, names in PARTS.items()} != got
    # the budget forms: a float, {"total": t}, and a Budget with pool auto
    assert pm.select_masks(scores, PARTS, {"total": 0.1}, pool="auto").keys() == masks.keys()
    b = pm.Budget(pool="auto", total=0.1)
    assert all(torch.equal(pm.select_masks(scores, PARTS, b)[n], masks[n]) for n in masks)


def test_auto_split_shares_exactly_caps_at_size_and_falls_back_to_size():
    from piece_mm.select import auto_split
    sizes = {"vision": 100, "projector": 10, "llm": 1000}
    assert auto_split(7, {"vision": 1.0, "projector": 1.0, "llm": 1.0}, sizes) == \
        {"vision": 3, "projector": 2, "llm": 2}  # 7/3 each: the one left over goes to the earliest
    # the projector's share (50 of 100) is more than its 10 elements: it takes them all, the 90 left split 1:3
    assert auto_split(100, {"vision": 1.0, "projector": 8.0, "llm": 3.0}, sizes) == \
        {"vision": 23, "projector": 10, "llm": 67}
    assert auto_split(11, {"vision": 0.0, "projector": 0.0, "llm": 0.0}, sizes) == \
        {"vision": 1, "projector": 0, "llm": 10}  # no mass anywhere: by size (1.0, 0.1, 9.9 -> 1, 0, 10)
    assert auto_split(5000, {"vision": 1.0, "projector": 0.0, "llm": 0.0}, sizes) == \
        {"vision": 100, "projector": 10, "llm": 1000}  # more than there is: all of it
    assert auto_split(0, {"vision": 1.0}, sizes) == {"vision": 0, "projector": 0, "llm": 0}


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
    # auto.yaml is default.yaml but for its pool: the same total, split by the scores
    assert {**load_budget("auto"), "pool": "component", "path": None} == {**load_budget("default"), "path": None}
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


def test_budget_is_the_typed_yaml_and_select_masks_takes_it(tmp_path):
    """pm.Budget.from_yaml holds every field of the file over the documented defaults; made in Python it is validated
    the same way; select_masks reads its fractions (or total), pool and granularity."""
    import yaml

    import piece_mm as pm
    from piece_mm.configs import DIR

    raw = yaml.safe_load((DIR / "budgets" / "default.yaml").read_text())
    b = pm.Budget.from_yaml("default")
    def given(got, want):  # the file's values, over the defaults of fields it leaves out (distill.answers, ...)
        if isinstance(want, dict):
            return all(given(got[k], v) for k, v in want.items())
        return got == want
    for k, v in raw.items():
        assert given(getattr(b, k), v), k
    assert b.to_dict() == load_budget("default") and b.path.endswith("default.yaml")
    with pytest.raises(InputError, match=r"^Budget: fractions\.llm is -0\.5"):
        pm.Budget(fractions={"llm": -0.5})
    with pytest.raises(InputError, match=r"^Budget: weight_decay is -1"):
        pm.Budget(weight_decay=-1)
    with pytest.raises(InputError, match=r"^Budget: unknown field 'fraction'"):
        pm.Budget.from_dict({"fraction": {"llm": 0.1}})
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(k, generator=gen) for n, k in (("v", 40), ("p", 10), ("l", 50))}
    parts = {"vision": ["v"], "projector": ["p"], "llm": ["l"]}
    for budget, pool, arg in [(pm.Budget(fractions={"vision": 0.1, "llm": 0.2}), "component",
                               {"vision": 0.1, "llm": 0.2}),
                              (pm.Budget(pool="global", total=0.15), "global", {"total": 0.15})]:
        got, want = pm.select_masks(scores, parts, budget), pm.select_masks(scores, parts, arg, pool=pool)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    # tensor granularity: whole tensors by mean score, as many as fit in k = 0.5 x 100 elements
    got = pm.select_masks(scores, parts, pm.Budget(pool="global", total=0.5, granularity="tensor"))
    assert sum(m.numel() for m in got.values()) <= 50 and all(m.numel() == scores[n].numel() for n, m in got.items())
