import json

import pytest
import torch

from piece_mm.errors import InputError
from piece_mm.eval.captioning import caption_scores
from piece_mm.eval.generate import generate
from piece_mm.models import CHECKPOINT_DIR, load_model
from piece_mm.tasks import world


@pytest.mark.parametrize("alias,cls", [("llava", "LlavaForConditionalGeneration"),
                                       ("qwen2-vl", "Qwen2VLForConditionalGeneration")])
def test_checkpoint_dir_reloads_with_auto_classes_and_captions(alias, cls):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = CHECKPOINT_DIR / alias
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (path / f).is_file(), f
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == cls
    examples = world.caption_set(world.HELDOUT_CAPTION_SEED, 40, prompt=world.CAPTION_EVAL_PROMPT)
    preds = generate(model, processor, examples, max_new_tokens=24)
    scores = caption_scores(preds, [ex.refs for ex in examples])
    assert scores["CIDEr"] >= 1.0, (scores, preds[:5])


def test_load_model_by_dir_equals_alias():
    m1, _ = load_model("llava")
    m2, _ = load_model(str(CHECKPOINT_DIR / "llava"))
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_unknown_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no-such-model"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_batched_generation_equals_one_at_a_time(tiny):
    # Left padding and the KV cache must not change greedy answers.
    alias, model, processor = tiny
    examples = world.caption_set(77, 6, prompt=world.CAPTION_EVAL_PROMPT) + world.general_vqa_set(78, 6)
    batched = generate(model, processor, examples, batch_size=12)
    single = [generate(model, processor, [ex], batch_size=1)[0] for ex in examples]
    assert batched == single
    assert not model.training


@pytest.mark.parametrize("alias", ["llava", "qwen2-vl"])
def test_zoo_build_is_deterministic(alias, tmp_path):
    from safetensors.torch import load_file

    from piece_mm import zoo
    a = zoo.build(alias, tmp_path / "a", steps=3)
    b = zoo.build(alias, tmp_path / "b", steps=3)
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    recipe = json.loads((a / "recipe.json").read_text())  # the recipe travels with the weights
    assert recipe["config"]["pretrain"]["steps"] == 3 and recipe["config"]["pretrain"]["seed"] == 0
    assert recipe["config"]["pretrain"]["mixture"] == zoo.model_config(alias)["pretrain"]["mixture"]
    assert recipe["threads"] >= 1 and recipe["time_s"] >= 0 and recipe["parameters"] > 0
    model, processor = load_model(str(a))
    assert type(model).__name__ == {"llava": "LlavaForConditionalGeneration",
                                    "qwen2-vl": "Qwen2VLForConditionalGeneration"}[alias]


def test_pretraining_mixture_draws_each_share():
    from piece_mm import zoo
    p = {"seed": 0, "steps": 40, "batch_size": 10,
         "mixture": {"captions": 0.5, "vqa": 0.2, "facts": 0.1, "prompted": 0.2}}
    data = zoo.pretraining_data(p)  # 40 x 10 / 4 = 100 examples: 50 + 20 + 10 + 20, each share + 1
    captions = [ex for ex in data if ex.refs]
    prompted = {q for qs, _, _ in world.PROMPTED.values() for q in qs}
    assert len(data) == 104 and len(captions) == 51
    assert sum(ex.prompt.partition(" , ")[0] in prompted for ex in data) == 21
    assert sum(ex.prompt in {q for q, _ in world.KNOWLEDGE} for ex in data) == 11
    with pytest.raises(ValueError, match="pretrain.mixture: unknown key"):
        zoo.pretraining_data({**p, "mixture": {"captions": 1.0, "replay": 0.0}})
    with pytest.raises(ValueError, match="sum to 0.900"):
        zoo.pretraining_data({**p, "mixture": {"captions": 0.9}})


def test_zoo_build_refuses_a_bad_mixture_in_one_line(tmp_path, monkeypatch, capsys):
    from piece_mm import zoo
    bad = tmp_path / "llava.yaml"
    cfg = zoo.model_config("llava")
    cfg["pretrain"]["mixture"]["captions"] = 0.9
    import yaml
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(zoo, "CONFIG_DIR", tmp_path)
    assert zoo.main(["build", "llava", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "pretrain.mixture" in err and "sum to" in err
    assert not (tmp_path / "out").exists()  # refused before anything is built
