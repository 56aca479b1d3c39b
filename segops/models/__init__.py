"""Reference segmentation models built on segops layers (see shared ARCHITECTURES.md)."""
from segops.models.complexity import summary
from segops.models.registry import build, list_models, register_model, run_on_backend

__all__ = ["build", "list_models", "register_model", "run_on_backend", "summary"]
