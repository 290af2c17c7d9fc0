"""SeqLoRA: one PEFT LoRA adapter on every linear layer of the LLM, trained on through the tasks."""
from __future__ import annotations

import torch

from piece_mm.methods import Setting, Tuning, register

ADAPTER = "default"
LORA = {"rank": Setting(int, 1), "alpha": Setting(float, 0.0), "dropout": Setting(float, 0.0, 1.0)}  # seqlora.yaml


def lora_targets(model) -> list[str]:
    """Names of the LLM's linear layers (every torch.nn.Linear whose weight is in the LLM component), the output
    head left out as PEFT's "all-linear" does."""
    from piece_mm.components import split_components
    llm = set(split_components(model, exclude=())["llm"])
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in llm and not n.endswith("lm_head")]


def inject(model, settings: dict) -> None:
    """Add the LoRA adapter (A random, B zero: the model's function is unchanged) to the LLM's linear layers."""
    from peft import LoraConfig, inject_adapter_in_model
    if lora_layers(model):
        return
    config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=lora_targets(model), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_layers(model) -> dict:
    """{module name: PEFT LoRA layer}."""
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_and_unload(model, settings: dict | None = None) -> None:
    """Add every adapter's B·A·scale into its base weight and put the plain layers back (a model that loads without
    PEFT)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


def lora_optimizer(model, lr: float):
    """AdamW over the adapter's weights only; every other weight frozen. An adapter left frozen (--exclude: its
    layer's name matches, e.g. the LLM's keys) stays frozen."""
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad_(False)
    from piece_mm import optim
    return optim.adamw([p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad], lr)


@register("seqlora", kind="lora", prepare=inject, finish=merge_and_unload, settings=LORA)
def seqlora(model, processor, task, ctx, masks=None):
    """LoRA (configs/methods/seqlora.yaml: r 8) on all linear layers of the LLM, one adapter trained on through every
    task (AdamW recreated per task)."""
    inject(model, ctx.settings)
    return Tuning(lora_optimizer(model, ctx.lr))
