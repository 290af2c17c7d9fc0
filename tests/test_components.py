import pytest
import torch
import transformers

import piece_mm as pm
from piece_mm.errors import InputError


def test_tiny_presets_split_with_real_names(tiny):
    alias, model, _ = tiny
    parts = pm.split_components(model)
    names = [n for n, _ in model.named_parameters()]
    placed = [n for c in parts.values() for n in c]
    assert len(placed) == len(set(placed))
    # everything but the token embeddings is placed, in the model's order
    assert sorted(placed) == sorted(n for n in names if "embed_tokens" not in n)
    assert "lm_head.weight" in parts["llm"]
    proj = "model.multi_modal_projector." if alias == "llava" else "model.visual.merger."
    assert parts["projector"] and all(n.startswith(proj) for n in parts["projector"])
    vis = "model.vision_tower." if alias == "llava" else "model.visual."
    assert parts["vision"] and all(n.startswith(vis) and ".merger." not in n for n in parts["vision"])
    assert all(n.startswith("model.language_model.") or n == "lm_head.weight" for n in parts["llm"])
    # exclusion is configurable: with none, the embeddings join the LLM
    assert any("embed_tokens" in n for n in pm.split_components(model, exclude=())["llm"])


@pytest.mark.parametrize("cls", ["LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                                 "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"])
def test_other_families_by_their_real_parameter_names(cls):
    C = getattr(transformers, cls)
    with torch.device("meta"):  # real default configs, no memory
        model = C(C.config_class())
    parts = pm.split_components(model)
    n_params = sum(1 for n, _ in model.named_parameters() if "embed_tokens" not in n)
    assert sum(map(len, parts.values())) == n_params
    assert all(parts.values())
    if "Qwen" in cls:
        assert any(".visual.merger." in n for n in parts["projector"])
        assert not any(".merger" in n for n in parts["vision"])
    else:
        assert any(n.endswith("image_newline") for n in parts["projector"])


def test_unknown_parameter_is_named_and_rules_place_it():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Linear(2, 2)
            self.adapter_xyz = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="adapter_xyz.weight"):
        pm.split_components(Odd())
    parts = pm.split_components(Odd(), rules={r"^adapter_xyz\.": "projector"})
    assert parts["projector"] == ["adapter_xyz.weight", "adapter_xyz.bias"]
    with pytest.raises(InputError, match="nowhere"):
        pm.split_components(Odd(), rules={r"^adapter_xyz\.": "nowhere"})
