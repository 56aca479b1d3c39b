"""Drop-in layers built on `segops.ops` (so they run on every backend)."""
from segops.nn.common import Scale
from segops.nn.criss_cross_attention import CrissCrossAttention
from segops.nn.disentangled_non_local import DisentangledNonLocal2d, NonLocal2d

__all__ = ["Scale", "CrissCrossAttention", "DisentangledNonLocal2d", "NonLocal2d"]
