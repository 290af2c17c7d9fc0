import pytest

from piece_mm.eval.captioning import caption_scores

REFS = [["two big red circles on the left", "there are two big red circles on the left"],
        ["a small blue square at the top", "there is a small blue square at the top"],
        ["three small white triangles on the right", "there are three small white triangles on the right"],
        ["a big green circle at the bottom", "there is a big green circle at the bottom"]]


def test_perfect_captions_score_at_the_top():
    s = caption_scores([r[0] for r in REFS], REFS)
    assert {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(s)
    assert s["BLEU_1"] == pytest.approx(1.0, abs=1e-3) and s["BLEU_4"] == pytest.approx(1.0, abs=1e-3)
    assert s["ROUGE_L"] == pytest.approx(1.0, abs=1e-3)
    assert s["METEOR"] > 0.9 and s["CIDEr"] > 1.0
    assert "SPICE" not in s  # not asked for


def test_wrong_captions_score_lower():
    good = caption_scores([r[0] for r in REFS], REFS)
    bad = caption_scores(["a yellow", "a yellow", "a yellow", "a yellow"], REFS)
    for k in ("BLEU_1", "METEOR", "ROUGE_L", "CIDEr"):
        assert bad[k] < good[k] / 2, k
    assert caption_scores(["", "", "", ""], REFS)["CIDEr"] == pytest.approx(0.0, abs=1e-6)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="reference"):
        caption_scores(["x"], REFS)


def test_answer_leak_counts_task_words_that_no_reference_uses():
    from piece_mm.eval.captioning import answer_leak

    answers = ["tiny", "huge", "Rojo", "three", "no",  # "three" is a caption word (REFS[2]): it never counts
               "because the shapes look rather pointy"]  # a long reply: its words are not looked for
    preds = ["two huge red circles on the left",  # leaks "huge"
             "tiny",                              # leaks, and is a bare answer
             "three small white triangles",       # "three" is in the references: clean
             "rojo.",                             # bare answer after normalisation (case, punctuation)
             "a big green circle at the bottom",  # clean
             "no",                                # a bare answer whose word no reference uses
             "because the shapes look pointy"]    # words of the long reply only: clean
    got = answer_leak(preds, REFS + REFS[:2], answers)
    # by hand: leak words {tiny, huge, rojo, no}; captions 0, 1, 3, 5 use one; 1, 3, 5 are bare answers
    assert got == {"answer_leak": pytest.approx(4 / 7), "bare_answer": pytest.approx(3 / 7)}
    assert answer_leak([r[0] for r in REFS], REFS, answers) == {"answer_leak": 0.0, "bare_answer": 0.0}


def test_the_loop_counts_the_task_answers_not_its_own_replies(monkeypatch):
    """The continual loop's evaluate measures the leak of the tasks' answers, whatever the model replied to the
    task questions (a reply that happens to be a caption's word must not count)."""
    from types import SimpleNamespace

    from piece_mm.continual import evaluate
    from piece_mm.eval import captioning, generate
    from piece_mm.tasks.base import Example

    captions = ["two huge red circles on the left", "tiny", "a big green circle at the bottom", "huge"]
    monkeypatch.setattr(generate, "generate", lambda *a, **k: ["left"])  # the task reply: a caption word
    monkeypatch.setattr(captioning, "general_scores", lambda *a, **k: ({}, list(captions)))
    seq = SimpleNamespace(tasks=[SimpleNamespace(test=[Example(None, "are they tiny or huge", "tiny")],
                                                 metric="exact")],
                          captions=[Example(None, "describe the image", r[0], refs=tuple(r)) for r in REFS],
                          vqa=[])
    scores, general, _ = evaluate(None, None, seq, None, 4, "test", task_answers=frozenset({"tiny", "huge"}))
    assert scores == [0.0]
    # by hand: captions 0, 1 and 3 use "tiny" or "huge"; 1 and 3 are nothing else
    assert general == {"answer_leak": pytest.approx(3 / 4), "bare_answer": pytest.approx(2 / 4)}
