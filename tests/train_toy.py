"""A tiny test-only model, "toy_fcn", registered on import (segops.train --import tests.train_toy):
two strided ConvModules and FCN heads (decode head on the second feature, auxiliary head on the
first), so the training tests run in seconds on a CPU."""
from torch import nn

from segops.models.heads.fcn_head import FCNHead
from segops.models.registry import _MODELS, register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder
from segops.nn import ConvModule


class TinyBackbone(nn.Module):
    def __init__(self, widths=(8, 16)) -> None:
        super().__init__()
        ins = (3,) + tuple(widths[:-1])
        self.stages = nn.ModuleList(ConvModule(i, o, 3, stride=2, padding=1)
                                    for i, o in zip(ins, widths))

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def toy_fcn(num_classes: int = 4) -> EncoderDecoder:
    head = FCNHead(16, 16, num_classes, num_convs=1, concat_input=False, in_index=1,
                   dropout_ratio=0.1)
    aux = FCNHead(8, 8, num_classes, num_convs=1, concat_input=False, in_index=0,
                  dropout_ratio=0.0)
    return EncoderDecoder(TinyBackbone(), head, auxiliary_head=aux)


if "toy_fcn" not in _MODELS:
    register_model("toy_fcn", toy_fcn)
