"""Exact per-sample squared gradients, Σ_n g_n², from one batched forward + backward.

g_n is the gradient of sample n's own loss (the mean over its answer tokens), exactly what a batch-1 loop computes.
The batched pass minimises Σ_n loss_n, so the gradient reaching a module's output is, row by row, the gradient of the
sample that row belongs to. A forward hook keeps each module's input and a hook on its output receives that gradient;
per-sample weight gradients are then closed-form:

- Linear, and convolutions seen as Linear over their patches (Conv2d through unfold; any ConvNd whose kernel covers
  its whole input, as Qwen's Conv3d patch embedding): G_n = Σ_rows g_r ⊗ x_r, one mm per sample;
- LayerNorm / RMSNorm (torch's and transformers' `variance_epsilon` kind): G_n = Σ_rows g_r ⊙ x̂_r;
- Embedding: G_n[v] = Σ_{rows of n with index v} g_r (segment sums, never a [B, vocab, dim] tensor);
- biases: Σ_rows g_r;
- CLIP / SigLIP vision embeddings: class_embedding gets the output's first row, position_embedding (indexed by a
  position_ids buffer broadcast over images) the output's rows by position.

Anything else (a parameter owned by another kind of module, a module reached other than through its __call__, a
batch whose images cannot be assigned to samples) is not guessed at: it is scored by a batch-1 loop over the batch's
samples, and a warning names the parameters. As a guard, every batch checks Σ_n G_n against autograd's own batch
gradient; a parameter whose rule disagrees goes to the loop too.

Rows belong to samples through dim 0 of a module's input: either dim 0 is the batch (text, LLaVA's image tower), or
the rows are image patches laid out image after image (Qwen's vision tower), split in proportion to each image's
patch count (`image_grid_thw`). Both need exactly one image per sample (or no images at all)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sample_losses(model, batch: dict) -> torch.Tensor:
    """[B] per-sample causal-LM losses, each the mean over that sample's own answer tokens (labels != -100), which is
    what model(**one_sample).loss gives. Samples without answer tokens get 0."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # [B, L, V]
    labels = batch["labels"][:, 1:]  # [B, L-1]
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum(1)  # [B]
    return tok.sum(1) / count.clamp_min(1)


def _kind(module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        if module.groups == 1 and module.padding_mode == "zeros":
            return "conv"
        return None
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    if isinstance(module, torch.nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm")
                                                 and hasattr(module, "variance_epsilon")):
        return "rmsnorm"
    if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        return "embedding"
    if type(module).__name__.endswith("VisionEmbeddings"):
        return "vision_embeddings"  # CLIP / SigLIP: [class token,] patches, + position_embedding(position_ids)
    return None


def _images_per_sample(model, batch: dict) -> torch.Tensor | None:
    """[B] number of images in each sample (runs of the image token), or None if the batch has no images."""
    if "pixel_values" not in batch:
        return None
    tok = getattr(model.config, "image_token_id", None)
    if tok is None:
        tok = getattr(model.config, "image_token_index", None)
    if tok is None:
        raise ValueError("the model config names no image token (image_token_id / image_token_index)")
    is_img = batch["input_ids"] == tok  # [B, L]
    starts = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
    return starts.sum(1)


def _row_counts(n_rows: int, B: int, patches: torch.Tensor | None) -> list[int] | None:
    """How many of a module input's dim-0 rows belong to each sample, or None if that cannot be told."""
    if n_rows == B:
        return [1] * B
    if patches is None or patches.numel() != B:
        return None
    total = int(patches.sum())
    if (n_rows * patches).remainder(total).any():
        return None
    return [int(c) for c in (n_rows * patches) // total]


def _by_sample(t: torch.Tensor, counts: list[int], feat_dims: int = 1):
    """Yield t's rows grouped by sample: one [B, rows, *feat] tensor when every sample has as many rows, else one
    [1, rows, *feat] per sample."""
    feat = t.shape[t.dim() - feat_dims:]
    if len(set(counts)) == 1:
        yield t.reshape(len(counts), -1, *feat)
    else:
        for part in torch.split(t, counts):
            yield part.reshape(1, -1, *feat)


class _Recorder:
    """Hooks on the modules that own scored parameters (per-sample parts, from each call's input and output
    gradient) and on the parameters themselves (the check against autograd's batch gradient, once it is complete)."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter]):
        by_id = {id(p): n for n, p in params.items()}
        self.owners: dict[str, list] = {n: [] for n in params}  # name -> [(module, kind, local name)]
        for module in model.modules():
            for local, p in module.named_parameters(recurse=False):
                if id(p) in by_id:
                    self.owners[by_id[id(p)]].append((module, _kind(module), local))
        # A vision embeddings module adds position_embedding(position_ids) with position_ids [1, rows], broadcast over
        # the images: the child Embedding never sees per-sample rows, so the parent scores it from its own output.
        for module in model.modules():
            pos = getattr(module, "position_embedding", None)
            if (_kind(module) == "vision_embeddings" and isinstance(pos, torch.nn.Embedding)
                    and torch.is_tensor(getattr(module, "position_ids", None)) and id(pos.weight) in by_id):
                self.owners[by_id[id(pos.weight)]] = [(module, "vision_embeddings", "position_embedding.weight")]
        self.params = params
        self.static_fallback = {n for n, owners in self.owners.items()
                                if not owners or any(kind is None for _, kind, _ in owners)}
        self.modules = {id(m): (m, kind) for n in params if n not in self.static_fallback
                        for m, kind, _ in self.owners[n]}
        self.scored_by = {key: [] for key in self.modules}  # module id -> [(param name, local name)] it scores
        for n in params:
            if n not in self.static_fallback:
                for m, _, local in self.owners[n]:
                    self.scored_by[id(m)].append((n, local))
        self.probes: dict[str, torch.Tensor] = {}  # random vectors for the cheap check of weight matrices

    @contextmanager
    def batch(self, B: int, patches: torch.Tensor | None, sq: dict, s: dict | None):
        """Hooks for one batch. Checked contributions go into sq (Σ_n G_n²) and s (autograd's Σ_n g_n); .failed
        names the parameters a rule could not score (rows not assignable, reused modules, a failed check)."""
        self.B, self.patches, self.sq, self.s = B, patches, sq, s
        self.local, self.sums, self.floor = {}, {}, {}  # this batch's parts, until the check passes
        self.calls = {n: 0 for n in self.params}
        self.failed: set[str] = set(self.static_fallback)
        handles = [p.register_post_accumulate_grad_hook(self._post(n)) for n, p in self.params.items()]
        handles += [m.register_forward_hook(self._forward_hook(kind)) for m, kind in self.modules.values()]
        try:
            yield self
            for n in list(self.local):  # hooks saw a call but no gradient arrived: it must all be zero
                self._settle(n, None)
        finally:
            for h in handles:
                h.remove()

    def _post(self, n: str):
        def hook(p):
            grad, p.grad = p.grad, None  # the dense gradient is not kept past this point
            self._settle(n, grad)
        return hook

    def _settle(self, n: str, grad: torch.Tensor | None) -> None:
        local, sums = self.local.pop(n, None), self.sums.pop(n, None)
        if n in self.failed:
            return
        if self.calls[n] != 1:  # tied or reused: per-sample parts would have to be summed before squaring
            self.failed.add(n)
            return
        grad = torch.zeros_like(self.sq[n]) if grad is None else grad.float()
        if local is None:
            local, sums = torch.zeros_like(grad), torch.zeros_like(grad)
        probe = self.probes.get(n)
        batch_sum = grad.reshape(grad.shape[0], -1) @ probe if probe is not None and sums.dim() == 1 and \
            grad.dim() > 1 else grad
        # Guard: the per-sample parts must add up to autograd's batch gradient. A gradient that is zero in exact
        # arithmetic (an attention key bias) is rounding noise on both sides, hence the floor.
        tol = 1e-3 * batch_sum.abs().max().item() + 1e-4 * self.floor.get(n, 0.0) + 1e-12
        if (sums - batch_sum).abs().max().item() > tol:
            self.failed.add(n)
            return
        self.sq[n].add_(local)
        if self.s is not None:
            self.s[n].add_(grad)

    def _forward_hook(self, kind):
        def hook(module, args, out):
            if not torch.is_tensor(out) or not out.requires_grad or not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach()
            mine = self.scored_by[id(module)]
            for n, _ in mine:
                self.calls[n] += 1
            counts = _row_counts(x.shape[0], self.B, self.patches)
            if counts is None:
                self.failed.update(n for n, _ in mine)
                return
            out.register_hook(lambda g: self._backward(module, kind, mine, x, g.detach(), counts))
        return hook

    def _backward(self, module, kind, mine, x, g, counts):
        g, x = g.float(), x.float()
        for n, local in mine:
            if n in self.failed or self.calls[n] != 1:
                continue
            sq = self.local.setdefault(n, torch.zeros_like(self.sq[n]))
            try:
                if kind == "embedding":
                    s = self.sums.setdefault(n, torch.zeros_like(sq))
                    self._embedding(module, x.long(), g, counts, sq, s)
                    self._floor(n, g.abs().reshape(-1, g.shape[-1]).sum(0).max().item())
                elif local == "position_embedding.weight":  # vision embeddings: output row t adds weight[ids[t]]
                    ids = module.position_ids.reshape(1, -1).expand(g.shape[0], -1)
                    if ids.shape[1] != g.shape[1]:
                        raise _Uncovered
                    s = self.sums.setdefault(n, torch.zeros_like(sq))
                    self._embedding(module.position_embedding, ids, g, counts, sq, s)
                    self._floor(n, g.abs().reshape(-1, g.shape[-1]).sum(0).max().item())
                elif kind in ("linear", "conv") and local == "weight":
                    self._matrix(n, module, kind, x, g, counts, sq)
                else:
                    t = self._rows(module, kind, local, x, g, counts)  # [rows, *param shape]: per-row parts
                    s = self.sums.setdefault(n, torch.zeros_like(sq))
                    for part in _by_sample(t, counts, sq.dim()):  # [c, rows, *shape]
                        G = part.sum(1)  # [c, *shape] per-sample gradients
                        sq.add_(G.square().sum(0))
                        s.add_(G.sum(0))
                    self._floor(n, t.abs().reshape(-1, *sq.shape).sum(0).max().item())
            except _Uncovered:
                self.failed.add(n)

    def _floor(self, n, value):
        self.floor[n] = max(self.floor.get(n, 0.0), value)

    def _matrix(self, n, module, kind, x, g, counts, sq):
        """Weights of Linear / conv: G_n = Σ_rows g_r ⊗ x_r, one sample at a time (mm + addcmul stays in cache; a
        [B, out, in] bmm result does not). The check uses a random probe v: (Σ_n G_n) v = Σ_r g_r (x_r · v)."""
        if kind == "conv":
            x, g = self._conv_rows(module, x, g)
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # [R, in], [R, out]
        for xb, gb in zip(_by_sample(x, counts), _by_sample(g, counts)):  # [c, rows, in], [c, rows, out]
            for j in range(xb.shape[0]):
                G = torch.mm(gb[j].reshape(-1, gb.shape[-1]).T, xb[j].reshape(-1, xb.shape[-1]))  # [out, in]
                sq.view(G.shape).addcmul_(G, G)
        v = self.probes.get(n)
        if v is None:
            gen = torch.Generator().manual_seed(len(self.probes))
            v = self.probes[n] = torch.randn(x2.shape[1], generator=gen).to(x2.device)
        xv = x2 @ v  # [R]
        s = self.sums.setdefault(n, torch.zeros(g2.shape[1], device=g2.device))
        s.add_(g2.T @ xv)
        self._floor(n, (g2.abs().T @ xv.abs()).max().item())

    def _rows(self, module, kind, local, x, g, counts):
        """Per-row gradient parts of a vector parameter (bias, norm weight, class token), rows grouped by sample."""
        if kind == "vision_embeddings":
            if local != "class_embedding" or counts != [1] * len(counts):
                raise _Uncovered
            return g[:, :1]  # [B, 1, D]: the class token is each image's first row
        if local == "bias":
            if kind == "conv":
                return g.movedim(1, -1)  # [N, *spatial, out]
            return g
        if kind == "layernorm":
            return g * F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if kind == "rmsnorm":
            if isinstance(module, torch.nn.RMSNorm):
                return g * F.rms_norm(x, module.normalized_shape, None, module.eps)
            return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
        raise _Uncovered

    @staticmethod
    def _conv_rows(module, x, g):
        """(patches [N, L, C·k…], grads [N, L, out]) so that the weight gradient is Σ_L g ⊗ patch."""
        N, out = g.shape[0], g.shape[1]
        spatial = x.shape[2:]
        if all(s == k for s, k in zip(spatial, module.kernel_size)) and not any(_as_tuple(module.padding)):
            return x.reshape(N, 1, -1), g.reshape(N, 1, out)  # the kernel covers the input: one patch
        if isinstance(module, torch.nn.Conv2d) and isinstance(module.padding, tuple):
            u = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [N, C·kh·kw, L]
            return u.transpose(1, 2), g.reshape(N, out, -1).transpose(1, 2)
        raise _Uncovered

    @staticmethod
    def _embedding(module, idx, g, counts, sq, s):
        """Σ_n G_n² straight into sq: rows of the same sample and index are summed first (segment sums over unique
        (sample, index) pairs), so no [B, vocab, dim] tensor is ever built."""
        D = g.shape[-1]
        sample = torch.repeat_interleave(torch.arange(len(counts), device=idx.device),
                                         torch.tensor(counts, device=idx.device) * idx[0].numel())
        flat, rows = idx.reshape(-1), g.reshape(-1, D)  # [R], [R, D]
        key = sample * module.num_embeddings + flat
        uniq, inv = torch.unique(key, return_inverse=True)
        seg = torch.zeros(len(uniq), D, device=g.device).index_add_(0, inv, rows)  # [U, D] per (sample, index)
        v = uniq % module.num_embeddings
        if module.padding_idx is not None:  # torch never sends a gradient to the padding row
            seg[v == module.padding_idx] = 0
        sq.index_add_(0, v, seg.square())
        s.index_add_(0, v, seg)


class _Uncovered(Exception):
    pass


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


class PerSample:
    """Adds exact Σ_n g_n² (and Σ_n g_n) of each batch's samples into running sums; see the module docstring."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter]):
        self.model, self.params = model, params
        self.recorder = _Recorder(model, params)
        self._warned: set[str] = set()

    def add(self, batch: dict, sq: dict, s: dict | None) -> int:
        """Score one batch; returns its number of samples."""
        B = batch["input_ids"].shape[0]
        images = _images_per_sample(self.model, batch)  # [B] or None
        if images is not None and not bool((images == 1).all()):  # rows cannot be told apart: all by the loop
            self._loop(batch, B, images, sorted(self.params), sq, s)
            return B
        patches = batch["image_grid_thw"].prod(-1) if "image_grid_thw" in batch else None
        for p in self.params.values():
            p.grad = None
        with self.recorder.batch(B, patches, sq, s) as rec:
            sample_losses(self.model, batch).sum().backward()
        if rec.failed:
            self._loop(batch, B, images, sorted(rec.failed), sq, s)
        return B

    def _loop(self, batch, B, images, names, sq, s):
        new = [n for n in names if n not in self._warned]
        if new:
            warnings.warn(f"per-sample scoring: {len(new)} parameter(s) not covered by the batched rules "
                          f"(e.g. {new[0]!r}) are scored by a batch-1 loop", stacklevel=4)
            self._warned.update(new)
        params = [self.params[n] for n in names]
        for one in split_samples(batch, B, images):
            grads = torch.autograd.grad(sample_losses(self.model, one).sum(), params, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    g = g.float()
                    sq[n].addcmul_(g, g)
                    if s is not None:
                        s[n].add_(g)


_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def split_samples(batch: dict, B: int, images: torch.Tensor | None) -> list[dict]:
    """One batch dict per sample. Image tensors are split by the images each sample holds (Qwen's pixel_values by
    its rows of patches); any other tensor must have the batch as dim 0."""
    out = [{} for _ in range(B)]
    per_sample_images = images.tolist() if images is not None else [0] * B
    for k, v in batch.items():
        if not torch.is_tensor(v):
            parts = [v] * B
        elif k == "pixel_values" and "image_grid_thw" in batch:
            rows = batch["image_grid_thw"].prod(-1)  # patches per image
            per_sample = [int(r.sum()) for r in torch.split(rows, per_sample_images)]
            parts = torch.split(v, per_sample)
        elif k in _IMAGE_KEYS and images is not None:
            parts = torch.split(v, per_sample_images)
        elif v.dim() and v.shape[0] == B:
            parts = torch.split(v, 1)
        else:
            raise ValueError(f"per-sample scoring: cannot split batch key {k!r} of shape {tuple(v.shape)} by sample")
        for d, part in zip(out, parts):
            d[k] = part
    for d, count in zip(out, per_sample_images):
        if count == 0:  # a text-only sample
            for k in _IMAGE_KEYS:
                d.pop(k, None)
    return out
