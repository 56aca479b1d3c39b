"""Drop-in layers built on `segops.ops` (so they run on every backend)."""
from segops.nn.common import Scale
from segops.nn.criss_cross_attention import CrissCrossAttention
from segops.nn.qco import QCO1d, QCO2d, STL, PyramidTextureExtraction, TextureEnhance

__all__ = ["Scale", "CrissCrossAttention", "QCO1d", "QCO2d", "TextureEnhance",
           "PyramidTextureExtraction", "STL"]
