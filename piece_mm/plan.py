"""Will it fit? `python -m piece_mm.plan --model DIR_OR_ID` reads only the model's config (no weights: the model is
built on the meta device) and prints, per component, the parameters, the eligible ones and the selected ones, the
bytes of weights, gradients, score sums and optimizer state, and the estimated peak of scoring and of training.

The activations are traced, not guessed: one forward and backward of a batch of the planned shape runs on the meta
device (shapes only, no memory, seconds even for 7B) under a dispatch mode that adds up the bytes of the tensors alive
at each moment (PeakMemory). The trace runs the code the run runs (transformers' own layers, its checkpointing, the
gradients dropped as scoring and the sparse optimizer drop them), with one substitution: attention is counted as a
fused kernel (flash or memory-efficient SDPA, what a GPU runs), which keeps q, k, v, its output and a log-sum-exp, never
the s x s matrix.

What the peaks leave out: the CUDA context and the allocator's fragmentation (often 0.5-2 GB on a GPU), and
evaluation (generation needs the weights and a KV cache, less than training)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from piece_mm.budget import distill_of, held_of
from piece_mm.components import COMPONENTS, split_components
from piece_mm.errors import InputError
from piece_mm.methods import METHODS, of_kind
from piece_mm.methods.piece import GRADIENT_SCORES
from piece_mm.select import budget_arg, component_k, load_budget

# fp32 score tensors a sparse method's estimator keeps per weight (PIECE-S: Σ g and Σ g²)
SCORE_TENSORS = {"piece-s": 2, "grad-magnitude": 2}
# what kind each method is, as it registered (methods/__init__.py): "sparse", "dense" (AdamW on whole weights, with
# fp32 masters for bf16 / fp16; ln only the norms) or "lora" (a PEFT adapter on the LLM's linear layers, in fp32)
DENSE, LORA = of_kind("dense"), of_kind("lora")
PLANNED = of_kind("sparse") + DENSE + LORA
# per selected element: fp32 master (the compact copy), its fp32 gradient, Adam's two fp32 moments, an int64 index
SPARSE_STATE_BYTES = 4 + 4 + 4 + 4 + 8
TEXT_TOKENS = 64  # text tokens per example when --max-length is not given (prompt + answer)
QWEN_IMAGE_SIZE = 448  # Qwen2-VL's processor resizes to its pixel budget; a common size when --image-size is not given
DTYPES = ("auto", "float32", "bfloat16", "float16")


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op creates inside the mode, until the storage is freed; `peak` is
    the most alive at once. Works on any device, meta included (a meta tensor has a size, not memory). `existing`
    (the weights and buffers) are never counted, not even when an op returns a view of them (a transposed weight)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.now = self.peak = 0
        for t in existing:
            self.live[t.untyped_storage()] = 0

    def _free(self, n: int) -> None:
        self.now -= n

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st in self.live:
            return
        n = st.nbytes()
        self.live[st] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


class _FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient SDPA keeps for backward: q, k, v, the output and a fp32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)  # grouped-query k, v stay as few heads as they are


@contextlib.contextmanager
def _meta_forward():
    """Fused attention, and no search for packed sequences in the position ids (a data-dependent check that a meta
    tensor cannot answer; the planned batch holds one sequence per row)."""
    import torch.nn.functional as F
    from transformers import masking_utils
    saved = F.scaled_dot_product_attention, getattr(masking_utils, "find_packed_sequence_indices", None)
    F.scaled_dot_product_attention = _sdpa
    if saved[1] is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved[0]
        if saved[1] is not None:
            masking_utils.find_packed_sequence_indices = saved[1]


def load_config(name: str):
    """The config of an alias, a local dir or a cached HF id, without any weights."""
    from transformers import AutoConfig

    from piece_mm.models import hub_reachable, resolve
    src = resolve(str(name))
    local = {"local_files_only": True} if isinstance(src, str) and not hub_reachable() else {}
    try:
        return AutoConfig.from_pretrained(src, **local)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {name!r}: cannot read its config ({first})") from None


def meta_model(config, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def _dtype(name: str, config) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":  # what from_pretrained(dtype="auto") would load: the checkpoint's own dtype
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    return getattr(torch, name)


def image_shape(config, image_size: int | None) -> dict:
    """Per image: the pixel input and the number of image tokens the LLM reads."""
    v = config.vision_config
    if config.model_type == "llava":
        size = image_size or v.image_size
        n = (size // v.patch_size) ** 2
        return {"family": "llava", "size": size, "tokens": n}
    if config.model_type == "qwen2_vl":
        size = image_size or QWEN_IMAGE_SIZE
        g = size // v.patch_size
        g -= g % v.spatial_merge_size
        return {"family": "qwen2_vl", "size": size, "grid": g, "tokens": g * g // v.spatial_merge_size ** 2}
    raise InputError(f"--model: model type {config.model_type!r} is not planned yet; the plan traces llava and "
                     "qwen2_vl models")


def _logits(model, config, img: dict, batch: int, text_len: int, dtype: torch.dtype):
    """One forward of a batch of the planned shape on the meta device: the logits [B, L, V]."""
    inner = model.model
    n_img = img["tokens"]
    if img["family"] == "llava":
        pixels = torch.empty(batch, 3, img["size"], img["size"], device="meta", dtype=dtype)
        feats = torch.stack(list(inner.get_image_features(pixel_values=pixels).pooler_output))
    else:  # Qwen2-VL: patches laid out image after image; their positions from the (known) grid
        from transformers.models.qwen2_vl import modeling_qwen2_vl as q
        v, g = config.vision_config, img["grid"]
        grid = torch.tensor([[1, g, g]] * batch)
        width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.empty(batch * g * g, width, device="meta", dtype=dtype)
        pos = q.get_vision_position_ids(grid, v.spatial_merge_size).to("meta")
        cu, longest = q.get_vision_attention_seqlens(grid, v)
        feats = inner.visual(pixels, grid_thw=grid, position_ids=pos, cu_seqlens=cu,
                             max_seqlen=longest).pooler_output.reshape(batch, n_img, -1)
    ids = torch.empty(batch, text_len, dtype=torch.long, device="meta")
    embeds = torch.cat([feats.to(dtype), inner.get_input_embeddings()(ids)], dim=1)
    del feats, pixels
    position = torch.arange(embeds.shape[1], device="meta").expand(batch, -1)
    if img["family"] == "qwen2_vl":
        position = position.unsqueeze(0).expand(3, -1, -1)
    hidden = inner.language_model(inputs_embeds=embeds, position_ids=position, use_cache=False)
    del embeds
    return model.lm_head(hidden.last_hidden_state)


def _trace(model, config, img: dict, batch: int, seq: int, trainable: set, drop_grads: bool, checkpointing: bool,
           dtype: torch.dtype, distill: float | None = None, cached: dict | None = None) -> int:
    """Peak bytes of one forward + backward on the meta device, weights excluded: activations, the gradients that
    are alive, the logits and the loss's fp32 copy of them; with `distill` (a temperature), also a teacher copy's
    forward and the exact KL's fp32 softmaxes (LwF); with `cached` (the budget's distill options), the cached term
    as regularise.Distillation computes it: the student's fp32 logits at the held positions (the text ones unless
    image_positions) and the top-k gathers, no teacher forward."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        p.grad = None
    hooks = []
    if drop_grads:  # scoring folds each gradient into its sums, the sparse optimizer gathers it; both drop it at once
        def drop(p):
            p.grad = None
        hooks = [p.register_post_accumulate_grad_hook(drop) for n, p in model.named_parameters() if n in trainable]
    from piece_mm.models import activation_checkpointing  # the run's own switch

    model.train()  # transformers checkpoints in training mode; the meta device has no dropout to randomise
    n_img, vocab = img["tokens"], config.text_config.vocab_size
    text_len = max(1, seq - n_img)
    try:
        with activation_checkpointing(model, checkpointing), _meta_forward(), \
                PeakMemory(list(model.parameters()) + list(model.buffers())) as mem:
            logits = _logits(model, config, img, batch, text_len, dtype)
            labels = torch.empty(logits.shape[0] * logits.shape[1], dtype=torch.long, device="meta")
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), labels)  # transformers' fp32 loss
            if distill:  # the teacher's forward (no graph) and the KL of the two at fp32, as methods/lwf.py computes
                with torch.no_grad():
                    teacher = _logits(model, config, img, batch, text_len, dtype)
                s, t = logits.float().view(-1, vocab) / distill, teacher.float().view(-1, vocab) / distill
                loss = loss + torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                         log_target=True, reduction="batchmean")
                del teacher, s, t
            if cached:  # regularise.Distillation's own computation, on meta tensors of the cache's shape
                from piece_mm.regularise import Distillation
                n = logits.shape[0] * (logits.shape[1] if cached.get("image_positions") else text_len)
                k = vocab if cached.get("top_k") is None else min(cached["top_k"], vocab)
                at = torch.empty(n, dtype=torch.long, device="meta")
                values = torch.empty(n, k, device="meta")
                indices = torch.empty(n, k, dtype=torch.int32, device="meta")
                reg = Distillation(temperature=cached["temperature"])
                loss = loss + reg._kl(logits.reshape(-1, vocab), at, values, indices,
                                      torch.empty(n, device="meta"))
                del at, values, indices
            del logits
            if any(p.requires_grad for p in model.parameters()):
                loss.backward()
            del loss
        return mem.peak
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.grad = None
        model.eval()


def plan(model: str, method: str = "piece-f", budget: str = "default", dtype: str = "bfloat16", batch_size: int = 16,
         max_length: int | None = None, gradient_checkpointing: bool = False, image_size: int | None = None,
         num_processes: int = 1, fsdp: bool = False) -> dict:
    """The plan as a dict (what --json prints): components, bytes and peak_bytes (score, train), per process.

    num_processes > 1 splits each global batch (and scoring batch) over the processes. fsdp: FSDP2 shards
    (piece_mm/shard.py), so each process holds 1/N of the weights, score sums and optimizer state, plus the
    gathered weights of two blocks (the one running and the one prefetched) and one block's unsharded gradients
    before they are reduce-scattered (counted as the whole gathered set, an upper bound)."""
    if method not in PLANNED:
        raise InputError(f"--method {method!r}: not planned; the plan covers {', '.join(PLANNED)}")
    for flag, v in (("--batch-size", batch_size), ("--max-length", max_length), ("--image-size", image_size),
                    ("--num-processes", num_processes)):
        if v is not None and v <= 0:
            raise InputError(f"{flag} {v}: expected a positive integer")
    if fsdp and not METHODS[method].sharded:
        raise InputError("--fsdp: planned for the sparse methods (piece_mm runs only those on FSDP2 shards)")
    if fsdp and num_processes < 2:
        raise InputError(f"--num-processes {num_processes}: FSDP2 shards over 2 or more")
    if batch_size < num_processes:
        raise InputError(f"--batch-size {batch_size}: split over --num-processes {num_processes}; expected at least "
                         f"{num_processes}")
    n_proc = num_processes
    batch_size = -(-batch_size // n_proc)  # this process's share of the global batch (the largest share)
    b = load_budget(budget)
    config = load_config(model)
    dt = _dtype(dtype, config)
    from piece_mm.models import ALIASES
    if image_size is None and model in ALIASES:  # the tiny models see the built-in world's pictures
        from piece_mm.zoo import model_config
        image_size = model_config(model)["image_size"]
    img = image_shape(config, image_size)
    seq = max_length or img["tokens"] + TEXT_TOKENS
    if seq <= img["tokens"]:
        raise InputError(f"--max-length {seq}: an example holds {img['tokens']} image tokens (image {img['size']} px) "
                         "and its text; expected more")
    m = meta_model(config, dt)
    named = dict(m.named_parameters())
    every = split_components(m, exclude=(), rules=b["components"])
    parts = split_components(m, exclude=b["exclude"], rules=b["components"])
    size = {c: sum(named[n].numel() for n in parts[c]) for c in COMPONENTS}
    arg = budget_arg(b)
    components = {}
    for c in COMPONENTS:
        sel = component_k(float(arg.get(c, 0.0)), size[c]) if b["pool"] == "component" else None
        components[c] = {"parameters": sum(named[n].numel() for n in every[c]), "eligible": size[c], "selected": sel}
    eligible = sum(size.values())
    if b["pool"] == "component":
        selected = sum(v["selected"] for v in components.values())
    else:  # global or auto: how the total splits over the components is known only after scoring
        frac = arg if isinstance(arg, float) else float(arg.get("total", sum(
            float(arg.get(c, 0.0)) * size[c] for c in COMPONENTS) / max(eligible, 1)))
        selected = component_k(frac, eligible)
    total = sum(p.numel() for p in m.parameters())
    width = torch.empty((), dtype=dt).element_size()
    weights = total * width
    out = {"model": str(model), "model_type": config.model_type, "method": method, "budget": b["path"],
           "dtype": str(dt).replace("torch.", ""), "batch_size": batch_size * n_proc, "max_length": seq,
           "processes": n_proc, "fsdp": fsdp, "batch_per_process": batch_size,
           "image": {k: v for k, v in img.items() if k != "family"}, "gradient_checkpointing": gradient_checkpointing,
           "components": components, "total": {"parameters": total, "eligible": eligible, "selected": selected}}
    if method in DENSE:
        return _dense(out, m, config, img, batch_size, seq, gradient_checkpointing, dt, method, b)
    if method in LORA:
        return _lora(out, m, config, img, batch_size, seq, gradient_checkpointing, dt, method)
    budgeted = [c for c in COMPONENTS if b["pool"] != "component" or float(arg.get(c, 0.0)) > 0]
    scored = {n for c in (budgeted if method in GRADIENT_SCORES else COMPONENTS) for n in parts[c]}
    score_sums = SCORE_TENSORS.get(method, 1) * 4 * sum(named[n].numel() for n in scored)
    trainable = {n for c in budgeted for n in parts[c]}  # any of them may hold a chosen element
    score_batch = 16 if b["score_batch_size"] == 1 else b["score_batch_size"]  # per-sample: chunks of 16
    if fsdp:  # each scoring batch is split over the shards; under data parallelism each process scores whole ones
        score_batch = -(-score_batch // n_proc)
    act_score = _trace(m, config, img, score_batch, seq, scored, True, gradient_checkpointing, dt) \
        if method in GRADIENT_SCORES + ("trace",) else 0
    if method == "trace":  # the probe: a short dense AdamW on every scored weight, then one pass of Σ g² on it
        n_scored = sum(named[n].numel() for n in scored)
        low = dt in (torch.bfloat16, torch.float16)
        w0 = n_scored * width  # the weights as the probe begins, restored after it
        probe_state = n_scored * (8 + (8 if low else 0))  # two fp32 moments (+ fp32 master and step gradient)
        act_probe = _trace(m, config, img, score_batch, seq, scored, False, gradient_checkpointing, dt)
        sums_pass = w0 + n_scored * width + score_sums + act_score  # W_0, the update ΔW, the Σ g² sums
        act_score = max(w0 + probe_state + act_probe, sums_pass) - score_sums
    d = distill_of(b)  # the cached term (regularise.Distillation): its KL in the trace, its cache in host memory
    held = held_of(b)  # the held prompts' rows join each step's batch (split over the processes like the rest)
    held_rows = -(-held["per_step"] // n_proc) if held else 0
    act_train = _trace(m, config, img, batch_size + held_rows, seq, trainable, True, gradient_checkpointing, dt,
                       cached=d)
    state = selected * SPARSE_STATE_BYTES
    largest = max((named[n].numel() for n in trainable), default=0) * width
    out["bytes"] = {"weights": weights, "gradients": largest, "score_sums": score_sums, "optimizer_state": state,
                    "activations_score": act_score, "activations_train": act_train}
    on_host = b["score_memory"] == "host"  # "auto" may keep them on the GPU: counted there, to be safe
    if fsdp:  # 1/N of everything sharded; two gathered blocks and one block's unsharded gradients on top
        block = _gathered(m) * width
        weights = -(-weights // n_proc) + block
        score_sums, state = -(-score_sums // n_proc), -(-state // n_proc)
        act_score, act_train = act_score + block, act_train + block
        out["bytes"].update(weights=weights, score_sums=score_sums, optimizer_state=state,
                            activations_score=act_score, activations_train=act_train, gathered_block=block)
    out["peak_bytes"] = {"score": weights + act_score + (0 if on_host else score_sums),
                         "train": weights + state + act_train}
    out["score_memory"] = b["score_memory"]
    out["distill"] = bool(d)
    out["held_rows"] = held_rows
    out["host_bytes"] = {"score_sums": score_sums if on_host else 0}
    if d:  # per example: its kept positions' k log-probabilities (fp32) and indices (int32), and the bucket (fp32)
        vocab = config.text_config.vocab_size
        k = vocab if d["top_k"] is None else min(d["top_k"], vocab)
        positions = seq if d["image_positions"] else seq - img["tokens"]
        out["teacher_cache"] = {"top_k": k, "positions_per_example": positions, "bytes_per_example":
                                positions * (8 * k + 4) + 8, "held_pool": held["pool"] if held else 0}
    out["peak_bytes_sums_on_host"] = {"score": weights + act_score}
    return out


def _dense(out: dict, m, config, img, batch_size, seq, checkpointing, dt, method, b) -> dict:
    """The plan of a method that tunes whole weights: the weights, their gradients (kept until the step), AdamW's
    two fp32 moments and, for bf16 / fp16 weights, the fp32 masters and the step's fp32 copy of the gradients
    (piece_mm/optim.py); EWC adds its fp32 Fisher and anchor, LwF a frozen copy of the model (its teacher) and the
    teacher's forward with the fp32 KL. ln tunes the normalisation layers only; replay, multitask and MIGU tune like
    SeqFT (MIGU's row masks are one bool per output row)."""
    from piece_mm.methods.ln import norm_params
    named = dict(m.named_parameters())
    trainable = set(norm_params(m)) if method == "ln" else set(named)
    n = sum(named[k].numel() for k in trainable)
    width = torch.empty((), dtype=dt).element_size()
    low = dt in (torch.bfloat16, torch.float16)
    weights = sum(p.numel() for p in m.parameters()) * width
    distill = None
    if method == "lwf":
        from piece_mm.methods import load_settings
        distill = load_settings("lwf")["temperature"]
    act = _trace(m, config, img, batch_size, seq, trainable, False, checkpointing, dt, distill)
    state = n * (8 + (4 if low else 0))  # two fp32 moments (+ the fp32 master)
    extra = {"ewc": 8 * n, "lwf": weights}.get(method, 0)  # EWC: Fisher + anchor; LwF: the teacher's weights
    transient = 4 * n if low else 0  # the step's fp32 gradients, beside the weights' own
    out["bytes"] = {"weights": weights, "gradients": n * width, "score_sums": 0, "optimizer_state": state,
                    "method_state": extra, "activations_train": act}
    out["total"]["selected"] = n
    out["peak_bytes"] = {"score": 0, "train": weights + state + extra + act + transient}  # act holds the gradients
    out["distill"] = bool(distill)
    return out


def _lora(out: dict, m, config, img, batch_size, seq, checkpointing, dt, method) -> dict:
    """The plan of SeqLoRA / O-LoRA: the adapter's A and B on every LLM linear layer (methods/seqlora.py), kept in fp32
    by PEFT, with their gradients and AdamW's two moments (16 bytes per adapter weight); the activations are those of
    a backward through the LLM's linear layers, whose own weights get no gradient. O-LoRA also keeps the earlier
    tasks' A matrices (fp32), one more adapter's A per task learned: not counted here (the first task's plan)."""
    from piece_mm.methods import load_settings
    from piece_mm.methods.seqlora import lora_targets
    rank = load_settings(method)["rank"]
    modules = dict(m.named_modules())
    targets = lora_targets(m)
    n = sum(rank * (modules[t].in_features + modules[t].out_features) for t in targets)
    width = torch.empty((), dtype=dt).element_size()
    weights = sum(p.numel() for p in m.parameters()) * width
    act = _trace(m, config, img, batch_size, seq, {f"{t}.weight" for t in targets}, True, checkpointing, dt)
    out["bytes"] = {"weights": weights + 4 * n, "gradients": 4 * n, "score_sums": 0, "optimizer_state": 8 * n,
                    "method_state": 0, "activations_train": act}
    out["total"]["selected"] = n
    out["peak_bytes"] = {"score": 0, "train": weights + 16 * n + act}
    out["distill"] = False
    return out


def _gathered(model) -> int:
    """Elements FSDP2 holds whole at once: the root's own parameters (embeddings, head, final norms; gathered for the
    whole forward and backward) and two blocks of `_no_split_modules` (the one running and the one prefetched)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    inner = [m for m in model.modules() if m is not model and type(m).__name__ in blocks]
    owned = {id(p) for m in inner for p in m.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in owned)
    return root + 2 * max([sum(p.numel() for p in m.parameters()) for m in inner] or [0])


def _gb(n) -> str:
    """A table cell of the "memory (GB)" column: GB, or MB (said so) below 0.1 GB."""
    return "-" if not n else f"{n / 1e9:,.2f}" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _size(n) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def render(p: dict) -> str:
    lines = [f"plan: {p['model']} ({p['model_type']}), {p['method']}, budget {p['budget']}, {p['dtype']}, "
             f"batch {p['batch_size']} x {p['max_length']} tokens (image {p['image']['size']} px = "
             f"{p['image']['tokens']} tokens)" + (", gradient checkpointing" if p["gradient_checkpointing"] else "")
             + (f"; per process, {p['processes']} processes" + (" on FSDP2 shards" if p["fsdp"] else
                                                                " (data parallel)") if p["processes"] > 1 else ""),
             "", f"{'component':<10} {'parameters':>15} {'eligible':>15} {'selected':>12}"]
    for c, v in list(p["components"].items()) + [("total", p["total"])]:
        sel = "pooled" if v["selected"] is None else f"{v['selected']:,}"
        lines.append(f"{c:<10} {v['parameters']:>15,} {v['eligible']:>15,} {sel:>12}")
    by = p["bytes"]
    lines += ["", f"{'memory (GB)':<34} {'scoring':>10} {'training':>10}",
              f"{'weights':<34} {_gb(by['weights']):>10} {_gb(by['weights']):>10}",
              f"{'fp32 score sums':<34} {_gb(by['score_sums']):>10} {'-':>10}",
              f"{'optimizer state':<34} {'-':>10} {_gb(by['optimizer_state']):>10}",
              f"{'activations and live gradients':<34} {_gb(by.get('activations_score', 0)):>10} "
              f"{_gb(by['activations_train']):>10}",
              f"{'estimated peak':<34} {_gb(p['peak_bytes']['score']):>10} {_gb(p['peak_bytes']['train']):>10}"]
    if p["method"] in LORA:
        lines.append(f"LoRA adapter: {p['total']['selected']:,} weights (fp32, in the weights' row), their fp32 "
                     "gradients and AdamW's two moments")
    elif p["method"] in DENSE:
        low = p["dtype"] in ("bfloat16", "float16")
        lines.append(f"tuned whole: {p['total']['selected']:,} weights; optimizer state = AdamW's two fp32 moments"
                     + (", the fp32 masters (piece_mm/optim.py) and, during the step, an fp32 copy of the gradients"
                        if low else ""))
        if by.get("method_state"):
            lines.append(f"{'EWC Fisher + anchor (fp32)' if p['method'] == 'ewc' else 'LwF teacher (a model copy)'}: "
                         f"{_gb(by['method_state'])} GB, in the training peak")
    else:
        where = "in host memory (score_memory: host), not in the peak" if p["score_memory"] == "host" else \
            f"counted on the GPU; in host memory (score_memory: host) the scoring peak is " \
            f"{_size(p['peak_bytes_sums_on_host']['score'])}"
        lines.append(f"score sums: {where}")
        lines.append(f"gradients: one weight's at a time (at most {_size(by['gradients'])}), inside the activations")
        if p.get("distill"):
            c = p.get("teacher_cache") or {}
            lines.append("distillation (budget's distill): the teacher ran once per example before the task; the KL "
                         "over its cached top-k log-probabilities is in the activations (no teacher forward)")
            if "bytes" in c:
                lines.append(f"teacher cache: {c['top_k']} log-probabilities at each of {c['positions_per_example']} "
                             f"positions per example, {_size(c['bytes'])} for {c['examples']:,} examples and "
                             f"{c['held_pool']} held rows, in host memory and <output>/distill/ (not in the peak)")
        if p.get("held_rows"):
            lines.append(f"held prompts (distill.held): {p['held_rows']} more rows per forward, in the activations")
    if p["fsdp"]:
        lines.append(f"weights: 1/{p['processes']} of them, plus the root's own and two blocks gathered whole "
                     f"({_size(by['gathered_block'])}); optimizer state: the chosen weights assumed spread evenly "
                     "over the shards")
    lines.append("not counted: the CUDA context and allocator slack (often 0.5-2 GB), and evaluation")
    c = p.get("compute")
    if c:
        procs = f", split over {p['processes']} GPUs" if p["processes"] > 1 else ""
        lines += ["", f"time per task (an estimate from FLOPs{procs}, at {c['tflops']:g} sustained TFLOP/s; "
                  f"{c['examples']:,} examples x {c['epochs']:g} epochs x {p['max_length']} tokens):",
                  f"  training {c['train_flops'] / 1e15:,.0f} PFLOP = {c['train_minutes']:.0f} min"
                  + (f"; scoring {c['score_flops'] / 1e15:,.0f} PFLOP = {c['score_minutes']:.1f} min"
                     if c["score_flops"] else "") + "; evaluation (generation) not estimated"]
    return "\n".join(lines)


def compute(p: dict, examples: int, epochs: float, tflops: float, score_examples: int | None = None) -> dict:
    """Time per task from FLOPs, an estimate (not a measurement): a forward costs 2 FLOPs per weight per token, a
    backward 4, gradient checkpointing one more forward; held rows widen each step's batch; LwF's teacher copy adds
    a forward per step, the budget's cached term one forward per example and held row before the task (counted with
    scoring, every process running all of them). Scoring is one forward and backward over the budget's
    score_examples. At `tflops` sustained TFLOP/s per GPU, one GPU per process. Evaluation (generation, bound by
    memory bandwidth) is not estimated."""
    weights, tokens = p["total"]["parameters"], p["max_length"]
    per_token = 6 + (2 if p["gradient_checkpointing"] else 0)
    train_tokens = examples * epochs * tokens
    cache = p.get("teacher_cache")
    step = per_token + (2 if p.get("distill") and not cache else 0)
    held = 1 + p.get("held_rows", 0) / max(1, p["batch_per_process"])
    train = train_tokens * weights * step * held
    scoring = (score_examples or 0) * tokens * weights * per_token
    rate = tflops * 1e12 * p["processes"]  # the work is split over the processes (one GPU each)
    if cache:  # every process runs the teacher over every example: not split
        scoring += (examples + cache["held_pool"]) * tokens * weights * 2 * p["processes"]
    return {"examples": examples, "epochs": epochs, "tflops": tflops, "train_flops": train, "score_flops": scoring,
            "train_minutes": train / rate / 60, "score_minutes": scoring / rate / 60}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.plan", description=(
        "Estimate, from a model's config alone (no weights are loaded), what a piece_mm run needs: parameters per "
        "component, bytes of weights, score sums and optimizer state, and the peak of scoring and of training."))
    ap.add_argument("--model", required=True, help="an alias (llava, qwen2-vl), a checkpoint dir (config.json is "
                    "enough) or a cached HF id")
    ap.add_argument("--method", default="piece-f", help=f"one of {', '.join(PLANNED)} (default piece-f)")
    ap.add_argument("--budget", default="default", help="a budget YAML (path or name in configs/budgets)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the weights' dtype (default bfloat16, what "
                    "the run uses on CUDA; auto = the checkpoint's own)")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per forward (with --grad-accum N: the "
                    "batch size / N)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per example, image tokens included "
                    f"(default: the image's tokens + {TEXT_TOKENS})")
    ap.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the vision "
                    f"config's, or {QWEN_IMAGE_SIZE} for Qwen2-VL)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="as the train flag of the same name")
    ap.add_argument("--num-processes", type=int, default=1, help="processes the global batch is split over "
                    "(default 1)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 shards over --num-processes "
                    "(configs/accelerate/fsdp2.yaml): memory per process")
    ap.add_argument("--examples", type=int, default=1000, help="training examples per task, for the time estimate "
                    "(default 1000)")
    ap.add_argument("--epochs", type=float, default=5, help="passes over them, for the time estimate (default 5)")
    ap.add_argument("--tflops", type=float, default=150, help="sustained bf16 TFLOP/s of the GPU, for the time "
                    "estimate (default 150: about half an A100's peak, a third of an H100's)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, v in (("--examples", args.examples), ("--epochs", args.epochs), ("--tflops", args.tflops)):
            if v <= 0:
                raise InputError(f"{flag} {v:g}: expected a positive number")
        p = plan(args.model, args.method, args.budget, args.dtype, args.batch_size, args.max_length,
                 args.gradient_checkpointing, args.image_size, args.num_processes, args.fsdp)
        if "teacher_cache" in p:  # its size at --examples, in host memory and on disk (an upper bound: every
            c = p["teacher_cache"]  # example at --max-length; held rows keep only their answers, counted whole)
            c["examples"] = args.examples
            c["bytes"] = (args.examples + c["held_pool"]) * c["bytes_per_example"]
            p["host_bytes"]["teacher_cache"] = c["bytes"]
        scored = load_budget(args.budget)["score_examples"] if METHODS[args.method].sparse else 0
        p["compute"] = compute(p, args.examples, args.epochs, args.tflops, min(scored, args.examples))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if args.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
