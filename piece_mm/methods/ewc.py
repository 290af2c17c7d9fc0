"""EWC (online): a Fisher-weighted L2 pull towards the weights after the previous task."""
from __future__ import annotations

from piece_mm import dist
from piece_mm.batching import collate
from piece_mm.importance import estimate_importance
from piece_mm.methods import Setting, Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.methods.seqft import adamw
from piece_mm.regularise import PerStep


def load_state(path, device=None) -> dict:
    """The Fisher and anchor of a saved state, on `device` (the weights' own: the pull multiplies them together)."""
    flat = load_tensors(path, device)
    return {k: {n[len(k) + 1:]: t for n, t in flat.items() if n.startswith(k + ".")} for k in ("fisher", "anchor")}


@register("ewc", regulariser="ewc", settings={"lambda": Setting(float, 0.0), "examples": Setting(int, 1)})
def ewc(model, processor, task, ctx, masks=None):
    """Full fine-tuning plus the pull (λ / 2) Σ F (θ − θ*)² towards the weights θ* after the previous task. F is the
    empirical Fisher (mean g², scaled to mean 1) summed over the earlier tasks. After each task, its Fisher and the
    anchor are saved in <output>/ewc/, where the next task (or a resumed run) reads them."""
    tuning = Tuning(adamw(model, ctx.lr))
    i, lam = ctx.index, ctx.settings["lambda"]  # configs/methods/ewc.yaml
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(iter(params.values())).device
    state = load_state(state_file(ctx, "ewc", i - 1), device) if i > 0 else None
    if state is not None:
        fisher, anchor = state["fisher"], state["anchor"]

        def pull(model):
            return lam / 2 * sum((fisher[n] * (p - anchor[n]).pow(2)).sum() for n, p in params.items()
                                    if n in fisher)
        tuning.regulariser = PerStep(pull)

    def after_task(model):
        examples = task.train[:ctx.settings["examples"]]
        batches = (collate(processor, c) for c in dist.share([examples[i:i + 16] for i in range(0, len(examples), 16)]))
        f = estimate_importance(model, batches, "piece-f", names=list(params))
        mean = sum(float(t.sum()) for t in f.values()) / max(1, sum(t.numel() for t in f.values()))
        f = {n: (t / mean if mean > 0 else t).to(device) for n, t in f.items()}
        if state is not None:
            f = {n: t + state["fisher"][n] for n, t in f.items()}
        new = {"fisher": f, "anchor": {n: p.detach().float().clone() for n, p in params.items()}}
        if ctx.main:
            save_tensors({f"{k}.{n}": t for k in new for n, t in new[k].items()}, state_file(ctx, "ewc", i))
        return new
    tuning.after_task = after_task
    return tuning
