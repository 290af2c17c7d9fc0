import pytest

from piece_mm.eval.cl_metrics import bwt, caption_retention, fwt, op, summary

# 3 tasks; row 0 before any task, row i after task i.
R = [[0.1, 0.2, 0.3],
     [0.9, 0.25, 0.1],
     [0.5, 0.8, 0.4],
     [0.3, 0.6, 0.7]]


def test_hand_computed():
    assert op(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    # BWT: task 1 lost 0.9 -> 0.3, task 2 lost 0.8 -> 0.6
    assert bwt(R) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    # FWT: task 2 before training on it (row 1) vs before anything; same for task 3 (row 2)
    assert fwt(R) == pytest.approx(((0.25 - 0.2) + (0.4 - 0.3)) / 2)


def test_single_task_and_retention():
    one = [[0.2], [0.9]]
    assert (op(one), bwt(one), fwt(one)) == (pytest.approx(0.9), 0.0, 0.0)
    assert caption_retention({"CIDEr": 4.0}, [{"CIDEr": 3.0}, {"CIDEr": 1.0}]) == pytest.approx(0.25)
    s = summary(R, {"CIDEr": 2.0}, [{"CIDEr": 1.0}] * 3)
    assert set(s) == {"OP", "BWT", "FWT", "caption_retention"} and s["caption_retention"] == pytest.approx(0.5)


def test_bad_shape():
    with pytest.raises(ValueError, match="T\\+1"):
        op([[0.1, 0.2], [0.3, 0.4]])
