import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(scope="session", params=["llava", "qwen2-vl"])
def tiny(request):
    """(alias, model, processor) for each embedded tiny checkpoint."""
    from piece_mm.models import load_model
    model, processor = load_model(request.param)
    return request.param, model, processor
