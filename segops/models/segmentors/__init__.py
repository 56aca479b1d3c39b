"""Segmentors. Importing this package registers every model with `segops.models.build`."""
from segops.models.segmentors import dilated_fcn, fpn_models, ocrnet_models  # noqa: F401
from segops.models.segmentors import bisenet_xception, dfanet, dfnet_seg, realtime  # noqa: F401
from segops.models.segmentors import gun, hyperseg, rgpnet, transformer_models  # noqa: F401
from segops.models.segmentors import semask, semask_mask2former  # noqa: F401
from segops.models.segmentors import transformer_models, window_transformers  # noqa: F401
from segops.models.segmentors import transformer_models  # noqa: F401
from segops.models.segmentors import context_models  # noqa: F401
from segops.models.segmentors import hyperseg_v0  # noqa: F401
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder

__all__ = ["EncoderDecoder", "CascadeEncoderDecoder"]
