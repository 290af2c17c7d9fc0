"""LwF: distillation from the model as it was when the task began, on the current task's inputs."""
from __future__ import annotations

import copy

import torch

from piece_mm.methods import Setting, Tuning, load_tensors, register, save_tensors, state_file
from piece_mm.methods.seqft import adamw


def distillation_loss(student_logits, teacher_logits, keep, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the next-token distributions at temperature T, summed over the vocabulary and
    averaged over the positions where `keep` ([B, L] bool) is True. The logits are [B, L, V]; the teacher's carry no
    gradient. LwF's term, and the sparse methods' (the budget's distill)."""
    s = student_logits[keep].float()  # [N, V]
    t = teacher_logits[keep].float()  # [N, V]
    T = temperature
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True,
                                    reduction="batchmean")
    return T * T * kl


def teacher_for(model, cfg):
    """A frozen copy of the model as the task begins. Its weights are saved (<output>/lwf/<task>.safetensors), so a
    task resumed midway distils from the same teacher."""
    path = state_file(cfg, "lwf", cfg["index"])
    teacher = copy.deepcopy(model).eval()
    if cfg["resumed"]:
        teacher.load_state_dict(load_tensors(path), strict=False)
    elif cfg["main"]:
        save_tensors({n: p for n, p in teacher.named_parameters()}, path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@register("lwf", settings={"temperature": Setting(float, 1e-6), "weight": Setting(float, 0.0)})
def lwf(model, processor, task, cfg, masks=None):
    """Full fine-tuning plus T² · KL(teacher ‖ student) of the next-token distributions at temperature T, averaged
    over the current task's non-padding positions, from the second task on."""
    tuning = Tuning(adamw(model, cfg["lr"]))
    if cfg["index"] == 0:
        return tuning
    teacher = teacher_for(model, cfg)

    def extra_loss(model, batch, out):
        with torch.no_grad():
            t = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        s = cfg["settings"]  # configs/methods/lwf.yaml
        return s["weight"] * distillation_loss(out.logits, t, batch["attention_mask"].bool(), s["temperature"])
    tuning.extra_loss, tuning.extra_per_position = extra_loss, True
    return tuning
