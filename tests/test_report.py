"""report.md's verdict: kept or lost against the stated threshold, tasks learned, forgetting, and SeqFT's figure
from results/ on the same model and task order."""
import json

from piece_mm.eval.report import seqft_reference, verdict, write_report


def _metrics(retention_after: float, threshold: float = 0.9) -> dict:
    R = [[0, 0, 0], [0.9, 0, 0], [0.7, 0.4, 0], [0.6, 0.3, 1.0]]
    return {"model": "m", "method": "piece-f", "seed": 0, "tasks": ["a", "b", "c"], "scores": R,
            "task_metrics": ["exact"] * 3, "retention_threshold": threshold, "time_s": 12.0,
            "summary": {"OP": (0.6 + 0.3 + 1.0) / 3, "BWT": ((0.6 - 0.9) + (0.3 - 0.4)) / 2, "FWT": 0.0,
                        "caption_retention": retention_after / 8.0},
            "trainable": {"llm": 5, "total": 5},
            "general": {"before": {"CIDEr": 8.0, "VQA": 0.8}, "after": [{"CIDEr": 8.0, "VQA": 0.8}] * 2 +
                        [{"CIDEr": retention_after, "VQA": 0.6}]}}


def test_the_first_ten_lines_give_the_verdict(tmp_path):
    write_report(tmp_path, _metrics(7.6))
    head = "\n".join((tmp_path / "report.md").read_text().splitlines()[:10])
    assert "General ability KEPT" in head and "retention 0.950" in head and "≥ 0.90" in head
    assert "Tasks learned: 2 of 3" in head  # b reached only 0.4 right after learning it (< 0.5)
    assert "a 0.90, b 0.40, c 1.00" in head
    assert "BWT -0.200" in head
    assert "retention 0.750" in head  # general VQA 0.6 / 0.8
    write_report(tmp_path, _metrics(7.6, threshold=0.97))
    assert "General ability LOST" in (tmp_path / "report.md").read_text().splitlines()[2]


def test_seqft_figure_comes_from_a_comparison_on_the_same_model_and_tasks(tmp_path):
    row = {"OP": [0.5, 0.7], "BWT": [-0.2, -0.4], "caption_retention": [0.3, 0.5]}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps(
        {"model": "m", "tasks": ["c", "b", "a"], "seeds": [0, 1], "methods": {"seqft": row}}))
    assert seqft_reference("m", ["a", "b", "c"], tmp_path) is None  # another order is another experiment
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "summary.json").write_text(json.dumps(
        {"model": "m", "tasks": ["a", "b", "c"], "seeds": [0, 1], "methods": {"seqft": row}}))
    ref = seqft_reference("m", ["a", "b", "c"], tmp_path)
    assert ref is not None and ref[0].parent.name == "same"
    line = verdict(_metrics(7.6), ref)[-1]
    assert "SeqFT" in line and "retention 0.400" in line and "OP 0.600" in line and "BWT -0.300" in line


def test_the_verdict_weighs_the_prompts_no_method_was_given(tmp_path):
    """Kept under the scored prompt but not under the unseen ones: the verdict says so, and the report has a table of
    CIDEr under each unseen prompt per stage, and the VQA split."""
    m = _metrics(8.0)
    unseen = {"p1": {"CIDEr": 4.0, "answer_leak": 0.0}, "p2": {"CIDEr": 2.0, "answer_leak": 0.0}}
    lost = {"p1": {"CIDEr": 1.0, "answer_leak": 0.5}, "p2": {"CIDEr": 2.0, "answer_leak": 0.0}}
    m["general"]["before"].update(unseen_prompts=unseen, VQA_unseen=0.5, VQA_seen=1.0)
    m["general"]["after"] = [{**a, "unseen_prompts": unseen, "VQA_unseen": 0.5, "VQA_seen": 1.0}
                             for a in m["general"]["after"][:2]] + [
        {**m["general"]["after"][2], "unseen_prompts": lost, "VQA_unseen": 0.25, "VQA_seen": 1.0}]
    m["summary"].update(caption_retention_unseen=(0.25 + 1.0) / 2, vqa_retention=1.0, vqa_retention_unseen=0.5)
    write_report(tmp_path, m)
    text = (tmp_path / "report.md").read_text()
    assert "General ability LOST where it is not scored" in text.splitlines()[2]
    assert "prompts no method was given:** caption retention 0.625" in text
    assert "0.500 over the questions asked in phrasings no method was given" in text
    assert '| after c | 1.000 (0.50) | 2.000 (0.00) |' in text
    m["summary"]["caption_retention_unseen"] = 0.95
    write_report(tmp_path, m)
    assert "General ability KEPT" in (tmp_path / "report.md").read_text().splitlines()[2]
