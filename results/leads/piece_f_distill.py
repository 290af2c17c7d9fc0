"""A feasibility run, not a method of piece_mm (results/README.md, "A lead"): PIECE-F at the default budget plus
LwF's distillation term, T² · W · KL(teacher ‖ student) at T = 2 over every position of the task's sequences, where
the teacher is a frozen copy of the model as each task begins, from the first task on (LwF proper starts at the
second). The sparse mask, optimizer and budget are PIECE-F's, unchanged.

    python results/leads/piece_f_distill.py 1.0 --model llava --seed 0 --eval-limit 100 --output runs/pfd-llava-s0

The first argument is W; the rest are `python -m piece_mm.train` flags. Not resumable: the teacher is not saved."""
import copy
import sys

import torch

import piece_mm.methods.piece  # noqa: F401  (registers piece-f)
from piece_mm.methods import METHODS

W, T = float(sys.argv[1]), 2.0
orig = METHODS["piece-f"].for_task


def for_task(model, processor, task, cfg, masks=None):
    teacher = copy.deepcopy(model).eval()  # before the sparse optimizer hooks the weights
    for p in teacher.parameters():
        p.requires_grad_(False)
    tuning = orig(model, processor, task, cfg, masks)

    def extra_loss(model, batch, out):
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            t = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits[keep].float()
        s = out.logits[keep].float()
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                        log_target=True, reduction="batchmean")
        return W * T * T * kl
    tuning.extra_loss = extra_loss
    return tuning


METHODS["piece-f"].for_task = for_task
from piece_mm.train import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
