"""piece_mm: modality-aware sparse continual tuning for vision-language models."""
from piece_mm.models import load_model

__all__ = ["load_model"]
