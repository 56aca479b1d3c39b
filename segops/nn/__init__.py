"""Drop-in layers built on `segops.ops` (so they run on every backend)."""
from segops.nn.common import Scale
from segops.nn.criss_cross_attention import CrissCrossAttention

__all__ = ["Scale", "CrissCrossAttention"]
