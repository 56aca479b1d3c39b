"""Pure-PyTorch reference implementations: the executable form of docs/operators.md §2.

Each function is differentiable by PyTorch autograd and is written the way the peer code
computes it, since it is also the baseline of the benchmark.
"""
from segops.reference.criss_cross_attention import criss_cross_attention
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d
from segops.reference.qco import qco_1d, qco_2d, texture_reconstruct
from segops.reference.disentangled_non_local import disentangled_non_local

# Every public callable imported above (derived, so each operator only adds its import line).
__all__ = sorted(name for name, obj in list(globals().items())
                 if not name.startswith("_") and callable(obj)
                 and getattr(obj, "__module__", "").startswith(__name__ + "."))
