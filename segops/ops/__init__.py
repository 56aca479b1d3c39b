"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch."""
from segops.ops.criss_cross_attention import criss_cross_attention
from segops.ops.interlaced_sparse_attention import interlaced_sparse_attention

__all__ = ["criss_cross_attention", "interlaced_sparse_attention"]
