"""Segmentors. Importing this package registers every model with `segops.models.build`."""
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder
from segops.models.segmentors import dilated_fcn  # noqa: F401  (registers the ResNet-D8 models)

__all__ = ["EncoderDecoder", "CascadeEncoderDecoder"]
from segops.models.segmentors import hrnet_models  # noqa: F401,E402
from segops.models.segmentors import transformer_models  # noqa: F401,E402
from segops.models.segmentors import fpn_models  # noqa: F401,E402
