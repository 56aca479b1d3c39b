"""Pure-PyTorch reference implementations: the executable form of SPEC §2.

Each function is differentiable by PyTorch autograd and is written the way the peer code
computes it, since it is also the baseline of the benchmark.
"""
from segops.reference.criss_cross_attention import criss_cross_attention
from segops.reference.disentangled_non_local import disentangled_non_local

__all__ = ["criss_cross_attention", "disentangled_non_local"]
