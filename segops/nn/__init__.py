"""Drop-in layers built on `segops.ops` (so they run on every backend)."""
from segops.nn.common import ConvModule, Scale
from segops.nn.self_attention_block import SelfAttentionBlock
from segops.nn.criss_cross_attention import CrissCrossAttention
from segops.nn.interlaced_sparse_attention import InterlacedSparseAttention
from segops.nn.semantic_difference_conv2d import SemanticDifferenceConv2d, SemanticDiffusion
from segops.nn.qco import QCO1d, QCO2d, STL, PyramidTextureExtraction, TextureEnhance
from segops.nn.disentangled_non_local import DisentangledNonLocal2d, NonLocal2d
from segops.nn.guided_upsampling import GuidedUpsampling
from segops.nn.psa_mask import PSAMask
from segops.nn.pafem import PAFEM
from segops.nn.smoothed_dilated_conv import SmoothedDilatedConv2d, smooth_dilated_convs

# Every public callable imported above (derived, so each operator only adds its import line).
__all__ = sorted(name for name, obj in list(globals().items())
                 if not name.startswith("_") and callable(obj)
                 and getattr(obj, "__module__", "").startswith(__name__ + "."))
