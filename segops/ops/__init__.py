"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch."""
from segops.ops.criss_cross_attention import criss_cross_attention
from segops.ops.qco import qco_1d, qco_2d, texture_reconstruct

__all__ = ["criss_cross_attention", "qco_1d", "texture_reconstruct", "qco_2d"]
