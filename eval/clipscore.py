"""CLIPScore and RefCLIPScore (Hessel et al., 2021) through open_clip.

CLIPScore(c, v) = 2.5 · max(cos(E_image(v), E_text("A photo depicts " + c)), 0)
RefCLIPScore = harmonic mean of CLIPScore and max(max_r cos(E_text(c), E_text(r)), 0), the references r embedded
with the same prompt.

The scorer is any open_clip model: a built-in architecture with a local weights file (`--clip-model ViT-B-32
--clip-weights <file>`), or a local dir in open_clip's own layout (open_clip_config.json + weights + tokenizer), such
as the tiny world CLIP shipped in piece_mm/checkpoints/clip-world. Nothing is downloaded."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch

from piece_mm.errors import InputError

WORLD_CLIP = Path(str(files("piece_mm") / "checkpoints" / "clip-world"))  # shipped as package data
PROMPT = "A photo depicts "
WEIGHT = 2.5


class CLIPScorer:
    def __init__(self, model, preprocess, tokenizer, name: str, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.to(device).eval(), preprocess, tokenizer
        self.name, self.device = name, device

    @torch.no_grad()
    def _text(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer([PROMPT + t for t in texts[i:i + batch]]).to(self.device))
               for i in range(0, len(texts), batch)]
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()  # [N, D]

    @torch.no_grad()
    def _images(self, images, batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            x = torch.stack([self.preprocess(im) for im in images[i:i + batch]]).to(self.device)
            out.append(self.model.encode_image(x))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()  # [N, D]

    def pairs(self, images, captions: Sequence[str], cand: torch.Tensor | None = None) -> torch.Tensor:
        """CLIPScore of each (image, caption) pair, [N]."""
        cand = self._text(captions) if cand is None else cand
        return WEIGHT * (self._images(images) * cand).sum(-1).clamp(min=0)

    def score(self, images, captions: Sequence[str], refs: Sequence[Sequence[str]] | None = None) -> dict:
        """Corpus means: {"CLIPScore"} and, with references, {"RefCLIPScore"}."""
        cand = self._text(captions)  # [N, D]
        clip = self.pairs(images, captions, cand)
        out = {"CLIPScore": float(clip.mean())}
        if refs is not None and all(refs):
            flat = [r for rs in refs for r in rs]
            r = self._text(flat)  # [sum refs, D]
            owner = torch.repeat_interleave(torch.arange(len(refs)), torch.tensor([len(rs) for rs in refs]))
            sims = (cand[owner] * r).sum(-1)  # each reference against its own candidate
            best = torch.full((len(refs),), -1.0).scatter_reduce(0, owner, sims, reduce="amax").clamp(min=0)
            out["RefCLIPScore"] = float(torch.where(clip + best > 0, 2 * clip * best / (clip + best).clamp(min=1e-12),
                                                    torch.zeros_like(clip)).mean())
        return out


def load_clip(model: str | None = None, weights: str | None = None, device: str = "cpu") -> CLIPScorer:
    """model None: the tiny world CLIP. A dir: open_clip's local-dir layout. Otherwise an open_clip architecture
    name, whose weights must be given as a local file."""
    import open_clip

    if model is None and weights is None:
        model = str(WORLD_CLIP)
    if model is None:
        raise InputError(f"--clip-weights {weights!r}: needs --clip-model (an open_clip architecture, e.g. ViT-B-32)")
    if Path(model).is_dir():
        if not (Path(model) / "open_clip_config.json").is_file():
            raise InputError(f"--clip-model {model!r}: directory has no open_clip_config.json")
        if not any(f.suffix in (".safetensors", ".bin", ".pth") for f in Path(model).iterdir()):
            raise InputError(f"--clip-model {model!r}: directory has no weights file (.safetensors, .bin or .pth)")
        name = f"local-dir:{model}"
        try:
            m, _, pre = open_clip.create_model_and_transforms(name, device=device)
            tok = open_clip.get_tokenizer(name)
        except Exception as e:  # a damaged config, weights of another shape, a missing tokenizer
            raise InputError(f"--clip-model {model!r}: not loadable as an open_clip dir ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        return CLIPScorer(m, pre, tok, str(model), device)
    if model.replace("/", "-") not in open_clip.list_models():
        raise InputError(f"--clip-model {model!r}: not an open_clip architecture nor a local dir "
                         f"(e.g. ViT-B-32, ViT-B-16, RN50)")
    if weights is None:
        raise InputError(f"--clip-model {model!r}: needs --clip-weights <local file> (nothing is downloaded)")
    if not Path(weights).is_file():
        raise InputError(f"--clip-weights {weights!r}: file not found")
    try:
        m, _, pre = open_clip.create_model_and_transforms(model, pretrained=str(weights), device=device)
    except Exception as e:  # a file of another architecture, or not a checkpoint at all
        raise InputError(f"--clip-weights {weights!r}: not loadable as {model} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return CLIPScorer(m, pre, open_clip.get_tokenizer(model), f"{model} ({weights})", device)
