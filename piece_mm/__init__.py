"""piece_mm: modality-aware sparse continual tuning for vision-language models."""
from piece_mm.budget import Budget
from piece_mm.components import split_components
from piece_mm.delta import apply_delta, load_delta, save_delta
from piece_mm.importance import estimate_importance
from piece_mm.models import load_model
from piece_mm.regularise import Distillation
from piece_mm.select import select_masks
from piece_mm.sparse import sparse_optimizer
from piece_mm.transfer import transfer_masks


def __getattr__(name):  # PieceCallback imports transformers' Trainer machinery: only when asked for
    if name == "PieceCallback":
        from piece_mm.trainer import PieceCallback
        return PieceCallback
    raise AttributeError(f"module 'piece_mm' has no attribute {name!r}")


__all__ = ["Budget", "load_model", "split_components", "estimate_importance", "select_masks", "sparse_optimizer",
           "save_delta", "load_delta", "apply_delta", "transfer_masks", "Distillation", "PieceCallback"]
