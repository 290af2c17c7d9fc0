import json

from piece_mm.eval import generate
from piece_mm.eval.probe import format_table, probe
from piece_mm.tasks.base import Example
from piece_mm.tasks.sequence import Task


def _examples(n, prompt, answers):
    return [Example(None, prompt, answers[i % len(answers)]) for i in range(n)]


def test_probe_counts_leaks_and_ignored_prompts_by_hand(monkeypatch):
    captions = [Example(None, "describe the image", "", refs=("a red circle", "one red circle")) for _ in range(4)]
    colour = Task("color", _examples(6, "what is the color in spanish", ["rojo", "verde"]),
                  _examples(4, "what is the color in spanish", ["rojo", "verde"]))
    count = Task("count", _examples(6, "how many in german", ["eins", "zwei"]),
                 _examples(4, "how many in german", ["eins", "zwei"]))
    replies = {"describe the image": ["a red circle", "a rojo circle", "one red circle", "rojo"],
               "what is the color in spanish": ["rojo", "a red circle", "verde", "blue"],
               "how many in german": ["eins", "eins", "one red circle", "drei"]}

    def fake_generate(model, processor, examples, batch_size=64, max_new_tokens=16, progress=None):
        return list(replies[examples[0].prompt][: len(examples)])
    monkeypatch.setattr(generate, "generate", fake_generate)
    r = probe(None, None, captions, [colour, count])
    # hand count: captions 2 and 4 use "rojo", a colour answer no reference uses; no caption uses a German word
    assert r["caption_leak"] == 0.5
    assert r["tasks"]["color"]["caption_leak"] == 0.5 and r["tasks"]["count"]["caption_leak"] == 0.0
    # a reply is compared with the caption of the same image: the count prompt got image 3's caption back
    assert r["tasks"]["color"]["reply_is_caption"] == 0.0
    assert r["tasks"]["count"]["reply_is_caption"] == 0.25
    assert r["tasks"]["color"]["reply_in_vocabulary"] == 0.5  # rojo, verde
    assert r["tasks"]["count"]["reply_in_vocabulary"] == 0.5  # eins, eins ("drei" is not a count answer here)
    # zero-shot: the test answers cycle rojo, verde, rojo, verde against the replies rojo, a red circle, verde, blue
    assert r["tasks"]["color"]["zero_shot"] == 0.25
    assert r["tasks"]["count"]["zero_shot"] == 0.25  # eins/eins, zwei/eins, eins/one.., zwei/drei
    assert "color" in format_table(r)
    json.dumps(r)


def test_probe_runs_on_a_real_model(tiny):
    # Any model the project loads: the record's shares are shares, and a base pretrained to follow the prompt
    # does not answer a task's prompt with its caption.
    from piece_mm.tasks.sequence import load_sequence
    _, model, processor = tiny
    seq = load_sequence("world")
    r = probe(model, processor, seq.captions[:8], [t for t in seq.tasks[:2]], batch_size=8)
    for t in r["tasks"].values():
        for k in ("caption_leak", "reply_is_caption", "reply_in_vocabulary", "zero_shot"):
            assert 0.0 <= t[k] <= 1.0
        assert t["reply_is_caption"] <= 0.25
