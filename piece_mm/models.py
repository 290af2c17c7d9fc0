"""`load_model`: the one factory. An alias resolves to an embedded tiny checkpoint; anything else goes to
from_pretrained as a local dir or an HF id, through exactly the same code."""
from __future__ import annotations

from pathlib import Path

from tasks.errors import InputError

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
ALIASES = ("llava", "qwen2-vl")


def resolve(name: str) -> Path | str:
    """Alias -> embedded checkpoint dir (built on first use if missing); a dir -> itself; 'org/name' -> HF id."""
    if name in ALIASES:
        path = CHECKPOINT_DIR / name
        if not (path / "config.json").is_file():
            from piece_mm import zoo  # first use on a machine without the shipped weights: build them here
            zoo.build(name, path)
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: model dir has no config.json")
        return path
    if path.exists():
        raise InputError(f"--model {name!r}: is a file; expected an alias ({', '.join(ALIASES)}), a checkpoint dir "
                         "or an HF id")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # an HF id: from_pretrained uses the local cache (offline here) or the hub
    raise InputError(f"--model {name!r}: neither an alias ({', '.join(ALIASES)}) nor a local checkpoint dir "
                     "nor an HF id")


def load_model(name: str, device: str = "cpu", dtype=None, trust_remote_code: bool = False):
    """(model, processor) for an alias ("llava", "qwen2-vl"), an HF id or a local dir. The model is in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = resolve(str(name))
    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {name!r}: cannot load ({first})") from None
    model.to(device).eval()
    if processor.tokenizer.pad_token_id is None:  # real LLMs often ship without one; batching needs it
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor
