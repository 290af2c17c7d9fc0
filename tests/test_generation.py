"""The caption prompt and the new-token limits come from the sequence YAML's `general` section or the CLI flags of the
same names; the defaults stay "describe the image", 24 and 8."""
import pytest

from piece_mm.tasks.sequence import GENERATION_DEFAULTS, load_sequence, with_generation

SEQ = "tasks:\n  - {name: color, format: world}\nworld: {train_examples: 8, test_examples: 4}\n"


def test_defaults_yaml_and_flags(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(SEQ + "general: {captions: 3, vqa: 2}\n")
    seq = load_sequence(p)
    assert seq.generation == GENERATION_DEFAULTS == {"caption_prompt": "describe the image",
                                                     "caption_max_new_tokens": 24, "answer_max_new_tokens": 8}
    assert {ex.prompt for ex in seq.captions} == {"describe the image"}
    p.write_text(SEQ + "general: {captions: 3, vqa: 2, caption_prompt: 'caption this', caption_max_new_tokens: 5}\n")
    seq = load_sequence(p)
    assert seq.generation["caption_prompt"] == "caption this" and seq.generation["caption_max_new_tokens"] == 5
    assert {ex.prompt for ex in seq.captions} == {"caption this"}
    flagged = with_generation(seq, caption_prompt="what is shown", caption_max_new_tokens=None,
                              answer_max_new_tokens=3)
    assert {ex.prompt for ex in flagged.captions} == {"what is shown"}
    assert flagged.generation == {"caption_prompt": "what is shown", "caption_max_new_tokens": 5,
                                  "answer_max_new_tokens": 3}
    assert [ex.refs for ex in flagged.captions] == [ex.refs for ex in seq.captions]


@pytest.mark.parametrize("line, says", [("caption_max_new_tokens: 0", "general.caption_max_new_tokens is 0"),
                                        ("answer_max_new_tokens: 'x'", "general.answer_max_new_tokens is 'x'"),
                                        ("caption_prompt: ''", "general.caption_prompt is ''")])
def test_bad_generation_settings_name_the_field(tmp_path, line, says):
    p = tmp_path / "s.yaml"
    p.write_text(SEQ + "general: {captions: 3, vqa: 2, " + line + "}\n")
    with pytest.raises(ValueError, match=says):  # tasks/ says it as a ValueError; piece_mm makes it an InputError
        load_sequence(p)
    with pytest.raises(ValueError, match="--answer-max-new-tokens"):
        with_generation(load_sequence("world"), answer_max_new_tokens=-1)


def test_the_limits_reach_generation(tiny, tmp_path):
    from piece_mm.continual import evaluate
    _, model, processor = tiny
    p = tmp_path / "s.yaml"
    p.write_text(SEQ + "general: {captions: 4, vqa: 2, caption_max_new_tokens: 2}\n")
    seq = load_sequence(p)
    _, _, samples = evaluate(model, processor, seq, None, 8, "eval", None, False, frozenset())
    assert all(len(processor.tokenizer(pred, add_special_tokens=False)["input_ids"]) <= 2 for pred, _ in samples)
