"""LwF: distillation from the model as it was when the task began, on the current task's inputs."""
from __future__ import annotations

import copy

import torch

from piece_mm.batching import model_inputs
from piece_mm.methods import Setting, Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.methods.seqft import adamw
from piece_mm.regularise import Regulariser, kl_sums


def teacher_for(model, ctx):
    """A frozen copy of the model as the task begins. Its weights are saved (<output>/lwf/<task>.safetensors), so a
    task resumed midway distils from the same teacher."""
    path = state_file(ctx, "lwf", ctx.index)
    teacher = copy.deepcopy(model).eval()
    if ctx.resumed:
        teacher.load_state_dict(load_tensors(path), strict=False)
    elif ctx.main:
        save_tensors({n: p for n, p in teacher.named_parameters()}, path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@register("lwf", regulariser="teacher", settings={"temperature": Setting(float, 1e-6), "weight": Setting(float, 0.0)})
def lwf(model, processor, task, ctx, masks=None):
    """Full fine-tuning plus T² · KL(teacher ‖ student) of the next-token distributions at temperature T, averaged
    over the current task's non-padding positions, from the first task on: on the first task the teacher is the
    base, as PIECE's default distils from the base from its first task (Li & Hoiem's LwF keeps the old tasks' heads;
    here the base's general ability is the first old task)."""
    tuning = Tuning(adamw(model, ctx.lr))
    teacher = teacher_for(model, ctx)

    tuning.regulariser = TeacherCopy(teacher, **ctx.settings)  # configs/methods/lwf.yaml
    return tuning


class TeacherCopy(Regulariser):
    """weight · T² · KL(teacher ‖ student) against a frozen copy of the model, run on every batch, summed over the
    batch's non-padding positions and counted by them (the loop averages over the step's)."""

    def __init__(self, teacher, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def counts(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"].sum().float().reshape(1)

    def __call__(self, model, batch: dict, out) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
        keep = batch["attention_mask"].bool()
        return (self.weight * kl_sums(out.logits, t, keep, self.temperature)).reshape(1)
