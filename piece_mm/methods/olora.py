"""O-LoRA (Wang et al., 2023): a new LoRA per task, kept orthogonal to the earlier tasks' LoRA subspaces.

The loss adds λ1 Σ_layers Σ |A_old A_newᵀ| (A_old: the earlier tasks' A matrices stacked) and λ2 Σ ||θ_new||₂ over
the new adapter's matrices (configs/methods/olora.yaml). λ1 = 0.5 and λ2 = 0 are the values of the authors' released
scripts (cmnfriend/O-LoRA, scripts/order_*.sh: --lamda_1 0.5 --lamda_2 0).

Earlier adapters are frozen, so their sum is merged into the base weights when the next task starts (the same
function, up to float rounding), and one PEFT adapter slot is re-initialised for each task. The earlier A matrices are
kept in <output>/olora/ for the orthogonality term."""
from __future__ import annotations

import torch

from piece_mm.methods import Setting, Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.methods.seqlora import ADAPTER, LORA, inject, lora_layers, lora_optimizer, merge_and_unload
from piece_mm.regularise import PerStep

SETTINGS = {"lambda_orth": Setting(float, 0.0), "lambda_l2": Setting(float, 0.0), **LORA}


def orthogonality(layers: dict, old: dict) -> torch.Tensor:
    """Σ over layers of Σ |A_old A_newᵀ|."""
    terms = [(old[n].to(layer.lora_A[ADAPTER].weight) @ layer.lora_A[ADAPTER].weight.T).abs().sum()
             for n, layer in layers.items() if n in old]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l2(layers: dict) -> torch.Tensor:
    """Σ ||A||₂ + ||B||₂ over the new adapter's matrices (Frobenius norms)."""
    return torch.stack([torch.linalg.vector_norm(m[ADAPTER].weight) for layer in layers.values()
                        for m in (layer.lora_A, layer.lora_B)]).sum()


def start_task(layers: dict) -> None:
    """Merge the previous task's adapter into the base weights and re-initialise it (A random, B zero)."""
    with torch.no_grad():
        for layer in layers.values():
            base = layer.get_base_layer().weight
            base += layer.get_delta_weight(ADAPTER).to(base.dtype)
            layer.reset_lora_parameters(ADAPTER, True)


@register("olora", kind="lora", regulariser="olora", prepare=inject, finish=merge_and_unload, settings=SETTINGS)
def olora(model, processor, task, ctx, masks=None):
    inject(model, ctx.settings)
    layers = lora_layers(model)
    orth, l2_weight = ctx.settings["lambda_orth"], ctx.settings["lambda_l2"]
    i = ctx.index
    if i > 0 and not ctx.resumed:
        start_task(layers)
    old = {}  # the earlier tasks' A matrices, on the adapters' device (the term multiplies them every step)
    device = next(iter(layers.values())).lora_A[ADAPTER].weight.device if layers else None
    for j in range(i):
        for n, a in load_tensors(state_file(ctx, "olora", j), device).items():
            old[n] = torch.cat([old[n], a]) if n in old else a
    tuning = Tuning(lora_optimizer(model, ctx.lr))
    if old or l2_weight:
        def penalty(model):
            loss = orth * orthogonality(layers, old) if old else 0.0
            return loss + l2_weight * l2(layers) if l2_weight else loss
        tuning.regulariser = PerStep(penalty)

    def after_task(model):
        if ctx.main:
            save_tensors({n: layer.lora_A[ADAPTER].weight for n, layer in layers.items()}, state_file(ctx, "olora", i))
    tuning.after_task = after_task
    return tuning


olora.__doc__ = __doc__

