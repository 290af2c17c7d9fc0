"""The tiny model zoo: build and pretrain the embedded LLaVA / Qwen2-VL checkpoints on the built-in visual world.

    python -m piece_mm.zoo build llava qwen2-vl   # both, side by side (one core each, ~45 min); or one alias
                                                  # -> piece_mm/checkpoints/<alias>: config, safetensors, tokenizer,
                                                  #    processor and recipe.json
    python -m piece_mm.zoo build clip-world   # the tiny CLIP behind CLIPScore on the world

The models are the real transformers classes with tiny configs (configs/models/<alias>.yaml) and a word-level
tokenizer over the world's vocabulary. Pretraining mixes captioning (several phrasings), general VQA, word facts and
prompt-selected vocabularies (tasks/world.py PROMPTED: the same attribute asked in French, as a fruit, in roman
numerals, ...), so that the base says what the prompt asks for, the way a real instruction-tuned VLM does, and a task
that teaches new answer words need not change what a caption says. The build is deterministic for a given config
(seed and threads included).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
import yaml

from piece_mm.configs import DIR as CONFIGS
from piece_mm.tasks import world

CONFIG_DIR = CONFIGS / "models"
CHECKPOINT_DIR = Path(str(files("piece_mm") / "checkpoints"))  # shipped as package data

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def model_config(alias: str) -> dict:
    path = CONFIG_DIR / f"{alias}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{path}: no tiny-model config for {alias!r}; known: {known}")
    with open(path) as f:
        return yaml.safe_load(f)


def _word_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, knowledge: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = world.vocabulary(knowledge) + ["user", "assistant", "system", "?", ".", ","]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    extra = [s for s in specials if s not in (bos, eos, pad, "<unk>")]
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", additional_special_tokens=extra, padding_side="right")


def build_untrained(alias: str, cfg: dict):
    """A randomly initialised tiny model of the real class, with its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    size = cfg["image_size"]
    # The word-knowledge vocabulary is there only when pretraining teaches it (configs/models: mixture.facts).
    knowledge = float(cfg.get("pretrain", {}).get("mixture", {}).get("facts", 0.0)) > 0
    if cfg["family"] == "llava":
        tok = _word_tokenizer(["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"],
                              bos="<s>", eos="</s>", pad="<pad>", knowledge=knowledge)
        ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        vision = CLIPVisionConfig(image_size=size, **cfg["vision"])
        text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **cfg["text"])
        # A 2-layer tower has no useful penultimate layer: take the last one (-1), so every vision weight gets gradient.
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", tie_word_embeddings=False)
        processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=cfg["vision"]["patch_size"],
                                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                   num_additional_image_tokens=1)
        model = LlavaForConditionalGeneration(config)
    elif cfg["family"] == "qwen2-vl":
        tok = _word_tokenizer(["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                              bos=None, eos="<|im_end|>", pad="<|endoftext|>", knowledge=knowledge)
        v = dict(cfg["vision"])
        pixels = {"shortest_edge": size * size, "longest_edge": size * size}
        common = dict(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                      temporal_patch_size=v["temporal_patch_size"], size=pixels)
        ip = Qwen2VLImageProcessor(**common)
        vp = Qwen2VLVideoProcessor(**common)
        t = dict(cfg["text"])
        rope = {"rope_type": "default", "rope_theta": float(t.pop("rope_theta", 10000.0)),
                "mrope_section": t.pop("mrope_section")}
        text = dict(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rope_parameters=rope, **t)
        vision = dict(in_channels=3, hidden_size=t["hidden_size"], **v)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                               image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        processor = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                     chat_template=QWEN_TEMPLATE)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(f"{CONFIG_DIR / (alias + '.yaml')}: field 'family' is {cfg['family']!r}; "
                         "expected 'llava' or 'qwen2-vl'")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor


MIXTURE_SETS = {  # mixture key -> the world's example set it draws from
    "captions": lambda seed, n, p: world.caption_set(seed=seed, n=n),
    "vqa": lambda seed, n, p: world.general_vqa_set(seed=seed, n=n),
    "facts": lambda seed, n, p: world.knowledge_set(seed=seed, n=n),
    "prompted": lambda seed, n, p: world.prompted_set(seed=seed, n=n, choice_fraction=p.get("choice_fraction", 0.2)),
}


def check_mixture(p: dict, where: str = "") -> None:
    """A config's pretrain.mixture: known keys, non-negative shares that sum to 1 (`where` names the file)."""
    mixture = p.get("mixture")
    if not isinstance(mixture, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in mixture.values()):
        raise ValueError(f"{where}pretrain.mixture is {mixture!r}; expected a mapping of non-negative shares")
    unknown = sorted(set(mixture) - set(MIXTURE_SETS))
    if unknown:
        raise ValueError(f"{where}pretrain.mixture: unknown key(s) {unknown}; expected some of {sorted(MIXTURE_SETS)}")
    if abs(sum(mixture.values()) - 1) > 1e-6:
        raise ValueError(f"{where}pretrain.mixture: shares sum to {sum(mixture.values()):.3f}; expected 1")


def pretraining_data(p: dict) -> list:
    """The pretraining examples of a config's `pretrain:` section: each mixture share of steps x batch / 4 examples
    (each is seen about four times), drawn from its own seed block so that changing one share leaves the others."""
    check_mixture(p)
    mixture = p["mixture"]
    total = p["steps"] * p["batch_size"] / 4
    data = []
    for k, key in enumerate(MIXTURE_SETS):  # a fixed order, so the seed blocks never move
        if mixture.get(key, 0) > 0:
            data += MIXTURE_SETS[key](p["seed"] * 10 + 1 + k, int(total * mixture[key]) + 1, p)
    return data


def pretrain(model, processor, cfg: dict) -> float:
    """Pretrain in place on the config's mixture; returns the mean loss of the last 100 steps."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from piece_mm.batching import training_batches

    p = cfg["pretrain"]
    data = pretraining_data(p)
    torch.manual_seed(p["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, p["warmup"], p["steps"])
    model.train()
    bar = tqdm(training_batches(processor, data, p["batch_size"], p["steps"], seed=p["seed"]), total=p["steps"],
               desc=f"pretrain {cfg['family']}", file=sys.stderr, mininterval=10)
    last = collections.deque(maxlen=100)
    for step, batch in enumerate(bar):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(last) / max(1, len(last))


def build(alias: str, out: Path | None = None, steps: int | None = None) -> Path:
    """Build, pretrain and save one tiny checkpoint, with `recipe.json` (config, mixture, seed, threads, versions,
    time, final loss) beside the weights. The same config, seed and thread count give the same weights."""
    import json
    import platform

    import transformers

    cfg = model_config(alias)
    if steps is not None:
        cfg["pretrain"]["steps"] = steps
    threads = int(cfg["pretrain"].get("threads", 1))
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # CPU kernels reduce in a thread-dependent order: fixed, for a deterministic build
    torch.set_flush_denormal(True)  # denormals make CPU steps ~10x slower on tiny models
    torch.manual_seed(cfg["pretrain"]["seed"])
    model, processor = build_untrained(alias, cfg)
    t0 = time.time()
    try:
        loss = pretrain(model, processor, cfg)
    finally:
        torch.set_num_threads(caller_threads)
    out = Path(out) if out else CHECKPOINT_DIR / alias
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    recipe = {"alias": alias, "command": f"python -m piece_mm.zoo build {alias}", "config": cfg,
              "parameters": n, "final_loss": round(loss, 4), "time_s": round(time.time() - t0, 1),
              "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version()}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"built {alias}: {n:,} parameters, {cfg['pretrain']['steps']} steps in {time.time() - t0:.0f}s "
          f"(loss {loss:.3f}) -> {out}")
    return out


def build_clip(alias: str, out: Path | None = None, steps: int | None = None) -> Path:
    """The tiny world CLIP (configs/models/clip-world.yaml): open_clip's CLIP with a custom config and a word-level
    tokenizer, trained contrastively on world images and captions, saved in open_clip's local-dir layout."""
    import json
    import tempfile

    import open_clip
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg = model_config(alias)
    PROMPT = cfg["text_prefix"]  # CLIPScore's (eval/clipscore.py); the zoo trains with it, eval scores with it
    p = cfg["pretrain"]
    if steps is not None:
        p["steps"] = steps
    torch.set_flush_denormal(True)
    torch.manual_seed(p["seed"])
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = world.vocabulary(knowledge=False) + PROMPT.lower().split()
    # </s> last: open_clip's text tower pools at the argmax token id, which must be the end of text
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<pad>", "<unk>"] + words + ["</s>"]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    model_cfg = json.loads(json.dumps(cfg["model_cfg"]))
    model_cfg["text_cfg"].update(vocab_size=len(vocab), pad_id=vocab["<pad>"], hf_tokenizer_name="local-dir")
    out = Path(out) if out else CHECKPOINT_DIR / alias
    with tempfile.TemporaryDirectory() as tmp:  # the dir is complete (weights too) only when training is done
        tok.save_pretrained(tmp)
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                    "preprocess_cfg": cfg["preprocess_cfg"]}))
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", load_weights=False)
        tokenize = open_clip.get_tokenizer(f"local-dir:{tmp}")
    data = world.caption_set(seed=p["seed"] * 10 + 5, n=p["steps"] * p["batch_size"] // 8)  # each seen ~8 times
    images = torch.stack([preprocess(ex.image) for ex in data])  # [N, 3, H, W]
    texts = tokenize([PROMPT + ex.answer for ex in data])  # [N, context]
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.1, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, p["warmup"], p["steps"])
    g = torch.Generator().manual_seed(p["seed"])
    t0 = time.time()
    model.train()
    for step in (bar := tqdm(range(p["steps"]), desc="pretrain clip", file=sys.stderr, mininterval=5)):
        idx = torch.randint(len(data), (p["batch_size"],), generator=g)
        image_features, text_features, logit_scale = model(images[idx], texts[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                           "preprocess_cfg": cfg["preprocess_cfg"]}, indent=1))
    print(f"built {alias}: {sum(q.numel() for q in model.parameters()):,} parameters, {p['steps']} steps in "
          f"{time.time() - t0:.0f}s -> {out}")
    return out


def _build_one(alias: str, out: Path | None, steps: int | None) -> Path:
    if model_config(alias).get("family") == "open_clip":
        return build_clip(alias, out, steps)
    return build(alias, out, steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.zoo", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and pretrain tiny checkpoints; several aliases build side by side, one "
                       "process each (each uses its config's `threads`)")
    b.add_argument("alias", nargs="+", help="llava, qwen2-vl or clip-world (configs/models/<alias>.yaml)")
    b.add_argument("--output", type=Path, default=None, help="default: piece_mm/checkpoints/<alias> (one alias only)")
    b.add_argument("--steps", type=int, default=None, help="override the config's pretraining steps")
    args = ap.parse_args(argv)
    try:
        for alias in args.alias:  # every alias and its mixture checked before any build starts
            cfg = model_config(alias)
            if cfg.get("family") != "open_clip":
                check_mixture(cfg.get("pretrain", {}), f"{CONFIG_DIR / alias}.yaml: ")
        if args.output and len(args.alias) > 1:
            raise FileNotFoundError(f"--output {args.output}: names one checkpoint dir; "
                                    f"{len(args.alias)} aliases given")
        if len(args.alias) == 1:
            _build_one(args.alias[0], args.output, args.steps)
            return 0
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(args.alias), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_build_one, a, None, args.steps) for a in args.alias]
            for job in jobs:
                job.result()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
