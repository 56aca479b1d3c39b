"""Pure-PyTorch reference implementations: the executable form of SPEC §2.

Each function is differentiable by PyTorch autograd and is written the way the peer code
computes it, since it is also the baseline of the benchmark.
"""
from segops.reference.criss_cross_attention import criss_cross_attention
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention

__all__ = ["criss_cross_attention", "interlaced_sparse_attention"]
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d

__all__ = ["criss_cross_attention", "semantic_difference_conv2d"]
from segops.reference.qco import qco_1d, qco_2d, texture_reconstruct

__all__ = ["criss_cross_attention", "qco_1d", "texture_reconstruct", "qco_2d"]
