"""`load_model`: the one factory. An alias resolves to an embedded tiny checkpoint; anything else goes to
from_pretrained as a local dir or an HF id, through exactly the same code."""
from __future__ import annotations

import contextlib
import os
from importlib.resources import files
from pathlib import Path

from piece_mm.errors import InputError

CHECKPOINT_DIR = Path(str(files("piece_mm") / "checkpoints"))  # shipped as package data
ALIASES = ("llava", "qwen2-vl")


def resolve(name: str) -> Path | str:
    """Alias -> embedded checkpoint dir; a dir -> itself; 'org/name' -> HF id. Loading never trains: an embedded
    checkpoint that is missing is an error naming the command that builds it."""
    if name in ALIASES:
        path = CHECKPOINT_DIR / name
        if not (path / "config.json").is_file():
            raise InputError(f"--model {name!r}: the embedded checkpoint {path} is missing; build it with "
                             f"`python -m piece_mm.zoo build {name}` (about 45 min on 2 cores)")
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
        # an HF id: from the local cache, or from the hub when it can be reached. Not cached and no hub is one line at
        # once, not minutes of retries.
        if not hf_cached(name) and not hub_reachable():
            from huggingface_hub.constants import HF_HUB_CACHE
            raise InputError(f"--model {name!r}: not in the local Hugging Face cache ({HF_HUB_CACHE}) and the hub "
                             "cannot be reached; download it where there is a network (e.g. `hf download "
                             f"{name} --local-dir DIR`) and pass the directory: --model DIR")
        return name
    raise InputError(f"--model {name!r}: neither an alias ({', '.join(ALIASES)}) nor a local checkpoint dir "
                     "nor an HF id")


def hf_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds this repo's config.json."""
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: from_pretrained says what is wrong with it
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or its host does not answer within
    `timeout` seconds (a machine with no network fails the name lookup at once)."""
    import socket
    from urllib.parse import urlparse
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in offline):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
               distributed_config=None):
    """(model, processor) for an alias ("llava", "qwen2-vl"), an HF id or a local dir. The model is in eval mode.

    distributed_config: transformers' DistributedConfig, e.g. DistributedConfig(fsdp_size=N) under N processes, to
    shard the model with FSDP2 as it loads (each rank reads only its shard); it then stays where transformers put
    it, and `device` is not used. See examples/trainer_piece.py."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = resolve(str(name))
    # a cached HF id with no hub to ask: read the cache only, with no update checks that would retry for minutes
    local = {"local_files_only": True} if isinstance(src, str) and not hub_reachable() else {}
    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code, **local)
        if distributed_config is not None:
            local["distributed_config"] = distributed_config
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code,
                                                            **local)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {name!r}: cannot load ({first})") from None
    if distributed_config is None:  # `.to()` is refused on parameters FSDP2 manages
        model.to(device)
    model.eval()
    if processor.tokenizer.pad_token_id is None:  # real LLMs often ship without one; batching needs it
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor


@contextlib.contextmanager
def activation_checkpointing(model, on: bool):
    """transformers' gradient checkpointing (non-reentrant, so only the tuned weights need gradients) while inside,
    with the KV cache off (checkpointing refuses one); generation gets both back afterwards. Scoring inside it
    checkpoints too (estimate_importance)."""
    if not on:
        yield
        return
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    use_cache = [getattr(c, "use_cache", None) for c in configs]
    for c in configs:
        c.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        for c, u in zip(configs, use_cache):
            c.use_cache = u
