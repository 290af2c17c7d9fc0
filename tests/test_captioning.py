import pytest

from eval.captioning import caption_scores

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
    from eval.captioning import answer_leak

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
