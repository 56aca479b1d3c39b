"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch."""
from segops.ops.criss_cross_attention import criss_cross_attention
from segops.ops.disentangled_non_local import disentangled_non_local

__all__ = ["criss_cross_attention", "disentangled_non_local"]
