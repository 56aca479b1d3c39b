"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch."""
from segops.ops.criss_cross_attention import criss_cross_attention
from segops.ops.interlaced_sparse_attention import interlaced_sparse_attention

__all__ = ["criss_cross_attention", "interlaced_sparse_attention"]
from segops.ops.semantic_difference_conv2d import semantic_difference_conv2d

__all__ = ["criss_cross_attention", "semantic_difference_conv2d"]
