"""TRACE probing as an importance estimator ("trace"), its update signatures and task specificity.

Following the TRACE authors' code:
- the probe is a short fine-tune of the scored weights on the task (AdamW, `probe_steps` steps over the scoring
  batches in order, gradient norm clipped at 1);
- L2 of a tensor = ‖W_probe − W_0‖_F / sqrt(numel), the RMS of the update; Fisher of a tensor = the mean over
  batches and elements of g_b², measured on the probed model with the loss on answer tokens;
- the two are min-max normalised (over the scored tensors) and mixed `mix` / 1 − mix (0.5 / 0.5);
- level="element" applies the same rule per element (|ΔW| and Σ_b g_b², min-max over all scored elements), for
  element-level selection; level="tensor" gives every element its tensor's score, for `granularity: tensor`.
The model comes back bit-identical to W_0 (the weights are copied back; the probe's optimizer is dropped).

Specificity of tensor t for this task = the mean over earlier tasks d' of cos(ΔW[t], ΔW_d'[t]); the lower, the more
task-specific. ΔW is kept per tensor as a count sketch (SKETCH_DIM buckets, a fixed hash of each element's index
and a random sign), whose inner products estimate those of ΔW, so a signature is SKETCH_DIM numbers per tensor
whatever the model size. The rule that combines it with the core score (`specificity`):
- "weight" (default): score × (1 − strength · max(spec, 0)): a tensor updated like an earlier task's loses weight;
- "filter": tensors with spec > threshold score −1, below every other (chosen only if the budget is left over);
- "none": the core score alone.
"""
from __future__ import annotations

import zlib

import torch

from piece_mm import dist
from piece_mm.importance.piece import _grad_sums
from piece_mm.importance.registry import register

SKETCH_DIM = 1024
SPECIFICITY_RULES = ("weight", "filter", "none")
LEVELS = ("element", "tensor")


def sketch(delta: torch.Tensor, name: str, dim: int = SKETCH_DIM) -> torch.Tensor:
    """Count sketch of a tensor [dim]: element i goes to bucket h(i) with sign s(i), both fixed by the name and the
    size, so sketches of the same tensor from different tasks are comparable."""
    flat = delta.detach().float().reshape(-1).cpu()
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{flat.numel()}".encode()))
    bucket = torch.randint(dim, (flat.numel(),), generator=g)
    sign = torch.randint(2, (flat.numel(),), generator=g).float().mul_(2).sub_(1)
    return torch.zeros(dim).index_add_(0, bucket, flat * sign)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def specificity(current: dict[str, torch.Tensor], history: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """{tensor: mean over earlier tasks of cos(ΔW, ΔW_earlier)}; 0 with no earlier task."""
    return {n: (sum(cosine(s, h[n]) for h in history if n in h) / max(1, sum(n in h for h in history)))
            for n, s in current.items()}


def cosine_matrix(sketches: list[dict[str, torch.Tensor]]) -> list[list[float]]:
    """Task × task: the mean of cos(ΔW_i, ΔW_j) over the tensors both probes moved."""
    out = []
    for a in sketches:
        row = []
        for b in sketches:
            shared = [n for n in a if n in b and float(a[n].norm()) > 0 and float(b[n].norm()) > 0]
            row.append(sum(cosine(a[n], b[n]) for n in shared) / len(shared) if shared else 0.0)
        out.append(row)
    return out


def _minmax(values: list[torch.Tensor]) -> list[torch.Tensor]:
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    span = hi - lo
    return [(v - lo) / span if span > 0 else torch.zeros_like(v) for v in values]


def probe(model, batches: list[dict], params: dict, steps: int, lr: float) -> None:
    """Fine-tune `params` in place for `steps` steps on `batches` (cycled). The caller keeps W_0 and restores it."""
    from piece_mm import optim
    opt = optim.adamw(list(params.values()), lr, betas=(0.9, 0.95))  # fp32 masters for bf16 weights
    device = next(iter(params.values())).device
    for step in range(steps):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
        model(**batch).loss.backward()
        if dist.world() > 1:  # every process probes on its own batches; the step follows the mean gradient
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            dist.sum_(grads)
            for p, g in zip(params.values(), grads):
                p.grad = g.div_(dist.world())
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@register("trace")
def trace(model, batches, params, probe_steps: int = 10, probe_lr: float = 1e-4, level: str = "element",
          mix: float = 0.5, specificity_rule: str = "weight", strength: float = 1.0, threshold: float = 0.5,
          history: list | None = None, probe_out: dict | None = None, **_):
    """TRACE scores (module docstring). probe_out, if given, receives {"sketch": {name: [SKETCH_DIM]}} (this task's
    update signature) and {"specificity": {name: float}}."""
    if level not in LEVELS:
        raise ValueError(f"trace: level {level!r}; expected one of {', '.join(LEVELS)}")
    if specificity_rule not in SPECIFICITY_RULES:
        raise ValueError(f"trace: specificity {specificity_rule!r}; expected one of {', '.join(SPECIFICITY_RULES)}")
    batches = list(batches)
    if not batches:
        raise ValueError("estimate_importance: `batches` yielded nothing")
    names = list(params)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    try:
        probe(model, batches, params, probe_steps, probe_lr)
        delta = {n: p.detach() - w0[n] for n, p in params.items()}
        _, sq = _grad_sums(model, batches, params, want_sum=False)  # Σ_b g_b² on the probed model
    finally:  # W_0 back, bit for bit, whatever happened
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w0[n])
                p.grad = None
    if level == "tensor":
        l2 = _minmax([delta[n].float().pow(2).mean().sqrt().reshape(1) for n in names])
        fi = _minmax([sq[n].mean().reshape(1) for n in names])  # the 1 / batches of the mean cancels in min-max
        core = {n: (mix * l2[i] + (1 - mix) * fi[i]).expand(params[n].shape).clone() for i, n in enumerate(names)}
    else:
        l2 = _minmax([delta[n].float().abs() for n in names])
        fi = _minmax([sq[n] for n in names])
        core = {n: mix * l2[i] + (1 - mix) * fi[i] for i, n in enumerate(names)}
    sketches = {n: sketch(delta[n], n) for n in names}
    spec = specificity(sketches, history or [])
    if specificity_rule == "weight":
        core = {n: c.mul_(max(0.0, 1.0 - strength * max(spec[n], 0.0))) for n, c in core.items()}
    elif specificity_rule == "filter":
        core = {n: c.fill_(-1.0) if spec[n] > threshold else c for n, c in core.items()}
    if probe_out is not None:
        probe_out.update(sketch=sketches, specificity=spec)
    return core
