"""Drop-in layers built on `segops.ops` (so they run on every backend)."""
from segops.nn.common import Scale
from segops.nn.criss_cross_attention import CrissCrossAttention
from segops.nn.interlaced_sparse_attention import InterlacedSparseAttention

__all__ = ["Scale", "CrissCrossAttention", "InterlacedSparseAttention"]
from segops.nn.semantic_difference_conv2d import SemanticDifferenceConv2d, SemanticDiffusion

__all__ = ["Scale", "CrissCrossAttention", "SemanticDifferenceConv2d", "SemanticDiffusion"]
