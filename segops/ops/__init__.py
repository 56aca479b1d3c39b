"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch."""
from segops.ops.criss_cross_attention import criss_cross_attention
from segops.ops.interlaced_sparse_attention import interlaced_sparse_attention
from segops.ops.semantic_difference_conv2d import semantic_difference_conv2d
from segops.ops.qco import qco_1d, qco_2d, texture_reconstruct
from segops.ops.disentangled_non_local import disentangled_non_local

# Every public callable imported above (derived, so each operator only adds its import line).
__all__ = sorted(name for name, obj in list(globals().items())
                 if not name.startswith("_") and callable(obj)
                 and getattr(obj, "__module__", "").startswith(__name__ + "."))
