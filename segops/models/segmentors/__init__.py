"""Segmentors. Importing this package registers every model with `segops.models.build`."""
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder

__all__ = ["EncoderDecoder", "CascadeEncoderDecoder"]
