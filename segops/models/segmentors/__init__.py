"""Segmentors. Importing this package registers every model with `segops.models.build`."""
from segops.models.segmentors import dilated_fcn, fpn_models, ocrnet_models  # noqa: F401
from segops.models.segmentors import transformer_models  # noqa: F401
from segops.models.segmentors import context_models  # noqa: F401
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder

__all__ = ["EncoderDecoder", "CascadeEncoderDecoder"]
