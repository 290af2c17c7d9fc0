"""Retention under prompts no method is given: which prompts are unseen, that nothing a method reads names them, and
how their retention is computed."""
from pathlib import Path

import pytest
import yaml

from piece_mm.eval.captioning import split_vqa
from piece_mm.eval.cl_metrics import summary
from piece_mm.methods.held import BANK_DIR, earlier_prompts, held_pairs, load_bank
from piece_mm.tasks import world
from piece_mm.tasks.sequence import SEQUENCE_DIR, load_sequence, with_generation

ROOT = Path(__file__).resolve().parent.parent


def _unseen_questions() -> set:
    qs = {q for prompts, _ in world.GENERAL_QUESTIONS.values() for q in prompts[1:]}
    return qs | {f"{world.UNSEEN_EXISTS} {c} {s}" for c in world.COLORS for s in world.SHAPES}


def test_no_method_is_given_an_unseen_prompt():
    """The unseen caption prompts and question phrasings appear in no prompt bank, in no world task's prompts, and
    in no shipped config a method reads (budgets, banks, method settings); the evaluation prompt is not unseen."""
    unseen = set(world.UNSEEN_CAPTION_PROMPTS) | _unseen_questions()
    assert world.CAPTION_EVAL_PROMPT not in unseen and len(world.UNSEEN_CAPTION_PROMPTS) >= 3
    # at least half of the caption prompts asked are unseen (the evaluation prompt is the one seen)
    assert len(world.UNSEEN_CAPTION_PROMPTS) / (len(world.UNSEEN_CAPTION_PROMPTS) + 1) >= 0.5
    for bank in BANK_DIR.glob("*.yaml"):
        assert not unseen & set(load_bank(str(bank))), bank
    task_prompts = {p for prompts, _ in world.TASKS.values() for p in prompts}
    assert not unseen & task_prompts
    for sub in ("budgets", "methods", "prompts"):
        for f in (ROOT / "configs" / sub).glob("*.yaml"):
            text = f.read_text()
            assert not [p for p in unseen if p in text], f


def test_every_general_question_is_seen_or_unseen_and_both_are_asked():
    vqa = world.general_vqa_set(world.HELDOUT_VQA_SEED, 200)
    flags = [world.unseen_question(ex.prompt) for ex in vqa]
    assert flags == [ex.prompt in _unseen_questions() for ex in vqa]
    assert 60 <= sum(flags) <= 160  # both kinds, in numbers that measure something
    seen = [ex.prompt for ex, f in zip(vqa, flags) if not f]
    assert all(q in world.SEEN_QUESTIONS or q.startswith("is there a ") for q in seen)


def test_the_sequence_carries_the_unseen_prompts(tmp_path):
    seq = load_sequence("world-yesno")
    assert seq.unseen_prompts == world.UNSEEN_CAPTION_PROMPTS
    assert seq.vqa_unseen == tuple(world.unseen_question(ex.prompt) for ex in seq.vqa)
    # asked for captions under an unseen prompt, that prompt is the evaluation's and no longer counted as unseen
    moved = with_generation(seq, caption_prompt=world.UNSEEN_CAPTION_PROMPTS[0])
    assert moved.unseen_prompts == world.UNSEEN_CAPTION_PROMPTS[1:]
    # a caption set of one's own names its unseen prompts; one that a task asks is refused
    f = tmp_path / "s.yaml"
    f.write_text("tasks: [{name: big, format: world}]\nworld: {train_examples: 4, test_examples: 2}\n"
                 "general: {captions: 2, vqa: 2, unseen_prompts: ['tell me about it']}\n")
    assert load_sequence(f).unseen_prompts == ("tell me about it",)
    f.write_text("tasks: [{name: big, format: world}]\nworld: {train_examples: 4, test_examples: 2}\n"
                 "general: {unseen_prompts: ['are the shapes big', 'is the shape big']}\n")
    with pytest.raises(ValueError, match=r"s\.yaml: general\.unseen_prompts: 'are the shapes big' is a task's"):
        load_sequence(f)
    f.write_text("tasks: [{name: big, format: world}]\ngeneral: {unseen_prompts: 3}\n")
    with pytest.raises(ValueError, match=r"general\.unseen_prompts is 3; expected a list of prompts"):
        load_sequence(f)


def test_every_shipped_sequence_keeps_its_unseen_prompts_away_from_its_tasks():
    for f in SEQUENCE_DIR.glob("*.yaml"):
        if yaml.safe_load(f.read_text()).get("general", {}).get("format", "world") == "world":
            load_sequence(f)  # refuses a task prompt among the unseen ones


def test_retention_under_unseen_prompts_is_the_mean_of_each_prompts_ratio():
    R = [[0.0], [1.0]]
    before = {"CIDEr": 4.0, "VQA": 0.8, "VQA_unseen": 0.5,
              "unseen_prompts": {"a": {"CIDEr": 2.0}, "b": {"CIDEr": 4.0}, "c": {"CIDEr": 0.0}}}
    after = [{"CIDEr": 2.0, "VQA": 0.4, "VQA_unseen": 0.25,
              "unseen_prompts": {"a": {"CIDEr": 1.0}, "b": {"CIDEr": 4.0}, "c": {"CIDEr": 1.0}}}]
    s = summary(R, before, after)
    assert s["caption_retention"] == pytest.approx(0.5)
    assert s["caption_retention_unseen"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # a prompt with no base CIDEr: 0
    assert s["vqa_retention"] == pytest.approx(0.5) and s["vqa_retention_unseen"] == pytest.approx(0.5)
    assert set(summary(R, {"CIDEr": 1.0}, [{"CIDEr": 1.0}])) == {"OP", "BWT", "FWT", "caption_retention"}
    assert split_vqa([True, False, True, True], [True, True, False, False]) == {"VQA_seen": 1.0, "VQA_unseen": 0.5}
    assert split_vqa([True], [False]) == {"VQA_seen": 1.0}


def test_held_prompts_take_each_earlier_tasks_prompts_and_every_group_gets_its_share():
    from piece_mm.tasks.sequence import Task
    a = Task("big", world.task_set("big", "train", 30), [])
    b = Task("many", world.task_set("many", "train", 30), [])
    got = earlier_prompts([a, b], per_task=1)
    assert got == [a.train[0].prompt, b.train[0].prompt]
    assert all(isinstance(p, str) for p in got)  # strings only: no earlier image or answer is kept
    assert set(earlier_prompts([a], per_task=16)) == set(world.TASKS["big"][0])
    pairs = held_pairs(10, [(["x", "y", "z"], 1.0), (["e"], 0.25)], pool=40, seed=0)
    assert [i for i, _ in pairs] == [j % 10 for j in range(40)]
    count = {p: sum(q == p for _, q in pairs) for p in "xyze"}
    assert count == {"x": 10, "y": 10, "z": 10, "e": 10}  # e: a quarter of the pool; the bank's three share the rest
    assert pairs == held_pairs(10, [(["x", "y", "z"], 1.0), (["e"], 0.25)], 40, seed=0)
    assert pairs != held_pairs(10, [(["x", "y", "z"], 1.0), (["e"], 0.25)], 40, seed=1)
    # no earlier task (the first one): the bank takes the whole pool
    assert {q for _, q in held_pairs(4, [(["x"], 1.0), ([], 0.5)], 8, seed=0)} == {"x"}


def test_protect_divides_each_score_by_its_share_of_the_held_importance():
    import torch

    from piece_mm.methods.held import protect_scores
    scores = {"a": torch.tensor([4.0, 2.0]), "b": torch.tensor([[1.0, 3.0]])}
    held = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[4.0, 2.0]])}  # mean 2
    got = protect_scores(scores, held, strength=2.0)
    want = {"a": [4.0 / 1.0, 2.0 / 3.0], "b": [[1.0 / 5.0, 3.0 / 3.0]]}
    assert all(torch.allclose(got[n], torch.tensor(want[n])) for n in scores)
    assert protect_scores(scores, held, 0.0)["a"].tolist() == [4.0, 2.0]  # strength 0: the ranking as it was
    zero = {n: torch.zeros_like(t) for n, t in held.items()}
    assert protect_scores(scores, zero, 5.0) is scores  # no held importance anywhere: nothing to protect


def test_a_bad_bank_is_one_line_naming_the_file(tmp_path):
    from piece_mm.budget import Budget
    from piece_mm.errors import InputError
    for text, says in [("prompts: []\n", "field 'prompts' is \\[\\]"), ("prompts: [1, 2]\n", "field 'prompts' is"),
                       ("prompts: [a\n", "not valid YAML")]:
        bank = tmp_path / "bank.yaml"
        bank.write_text(text)
        with pytest.raises(InputError, match=r"^Budget: .*bank\.yaml: " + says) as e:
            Budget(distill={"weight": 1.0, "held": {"weight": 1.0, "bank": str(bank)}})
        assert "\n" not in str(e.value)


def test_earlier_answers_are_each_prompts_trained_answers_unless_free_form():
    from piece_mm.methods.held import FORM_MAX, earlier_answers
    from piece_mm.tasks.base import Example
    from piece_mm.tasks.sequence import Task
    a = Task("a", [Example(None, "p", "x"), Example(None, "q", "y"), Example(None, "p", "x")], [])
    b = Task("b", [Example(None, "p", "z")], [])
    free = Task("c", [Example(None, "r", f"caption {i}") for i in range(FORM_MAX + 1)] + [Example(None, "q", "w")], [])
    assert earlier_answers([a, b]) == {"p": ("x", "y", "z"), "q": ("x", "y")}  # a task's answers, per prompt it asks
    assert earlier_answers([a, free]) == {"p": ("x", "y")}  # q is also a free-form task's prompt: not constrained


def test_crop_boxes_are_a_seeded_share_of_windows_inside_the_picture():
    from PIL import Image

    from piece_mm.methods.held import crop_boxes, cropped
    from piece_mm.tasks.base import Example
    boxes = crop_boxes(400, 0.5, seed=3)
    assert boxes == crop_boxes(400, 0.5, seed=3) and boxes != crop_boxes(400, 0.5, seed=4)
    cut = [b for b in boxes if b]
    assert 160 <= len(cut) <= 240 and crop_boxes(50, 0.0, 3) == [None] * 50
    assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.34 <= x1 - x0 <= 0.66 for x0, y0, x1, y1 in cut)
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    ex = Example(im, "p", "a")
    assert cropped(ex, None) is im
    left = cropped(ex, (0.0, 0.0, 0.5, 1.0))
    assert left.size == (40, 20) and left.getpixel((35, 10)) == (255, 0, 0)  # the left half, scaled to the whole
