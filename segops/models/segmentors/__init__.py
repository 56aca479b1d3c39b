"""Segmentors. Importing this package registers every model with `segops.models.build`."""
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder
from segops.models.segmentors import dilated_fcn  # noqa: F401  (registers the ResNet-D8 models)

__all__ = ["EncoderDecoder", "CascadeEncoderDecoder"]
