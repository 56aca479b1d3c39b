"""Context-head segmentors of the model zoo's third part (issue 17), on the dilated ResNet
backbones of `dilated_fcn` (19 Cityscapes classes by default). Each factory's docstring names
the reference it follows and says which segops operator, if any, its head runs on.
"""
from __future__ import annotations

from segops.models.heads.psa_head import PSAHead
from segops.models.registry import register_model
from segops.models.segmentors.dilated_fcn import d8_segmentor


def psanet(depth: int, **kw):
    """PSANet: mmseg `configs/_base_/models/psanet_r50-d8.py` (PSAHead bi-direction, mask 97 x 97,
    shrink factor 2, softmax, normalization factor 1; auxiliary FCNHead weight 0.4)."""
    return d8_segmentor(depth, PSAHead, mask_size=(97, 97), shrink_factor=2,
                        normalization_factor=1.0, psa_softmax=True, **kw)


for _method, _factory, _depths in (("psanet", psanet, (50, 101)),):
    for _depth in _depths:
        register_model(f"{_method}_r{_depth}-d8", _factory, depth=_depth)
