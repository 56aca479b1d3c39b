"""Real-time model zoo (issue 16): parameter counts at the reference configs, mmseg state_dict
keys, eval outputs at odd sizes, train-mode auxiliary / detail outputs and their loss terms.

Parameter counts of the mmseg-config models are mmseg 1.2.2's own models built from the named
configs (`tests/mmseg_reference.build_mmseg`, SyncBN as BN, 19 classes) and counted with
`sum(p.numel() for p in model.parameters())`; the STDC counts include the detail head's fixed
3-element `fusion_kernel` parameter, as mmseg's do. The state_dict test rebuilds mmseg's model
live and compares keys and shapes.
"""
from __future__ import annotations

import pytest
import torch

from segops import models
from segops.models.loss_terms import LOSS_NAMES

# name -> (mmseg config, parameter count of mmseg's model from that config).
MMSEG = {
    "bisenetv1_r18-d32": ("bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py",
                          13_425_721),
    "bisenetv2_fcn": ("bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py", 14_804_255),
    "stdc1": ("stdc/stdc1_4xb12-80k_cityscapes-512x1024.py", 8_573_022),
    "stdc2": ("stdc/stdc2_4xb12-80k_cityscapes-512x1024.py", 12_603_486),
    "icnet_r18-d8": ("icnet/icnet_r18-d8_4xb2-80k_cityscapes-832x832.py", 25_174_393),
    "icnet_r50-d8": ("icnet/icnet_r50-d8_4xb2-80k_cityscapes-832x832.py", 47_827_833),
}

REAL_TIME_MODELS = ("bisenetv1_r18-d32", "bisenetv1_xception39", "bisenetv2_fcn", "stdc1", "stdc2",
                    "icnet_r18-d8", "icnet_r50-d8", "dfanet-a", "dfanet-b", "dfnet-df1",
                    "dfnet-df2", "hyperseg-m", "hyperseg-s", "hyperseg-l", "gun", "rgpnet")
# name -> number of "aux" outputs in train mode (others: none); STDC also returns "detail".
N_AUX = {"bisenetv1_r18-d32": 2, "bisenetv1_xception39": 2, "bisenetv2_fcn": 4, "stdc1": 2,
         "stdc2": 2, "icnet_r18-d8": 2, "icnet_r50-d8": 2}
EXTRA_OUTPUTS = {"stdc1": ("detail",), "stdc2": ("detail",)}

# Loss weights of the reference configs: (main, aux...) and the extra outputs' losses.
LOSS_WEIGHTS = {
    "bisenetv1_r18-d32": [("out", "cross_entropy", 1.0)] + [(f"aux.{i}", "cross_entropy", 1.0)
                                                           for i in range(2)],
    "bisenetv2_fcn": [("out", "cross_entropy", 1.0)] + [(f"aux.{i}", "cross_entropy", 1.0)
                                                       for i in range(4)],
    "stdc1": [("out", "ohem_cross_entropy", 1.0), ("aux.0", "ohem_cross_entropy", 1.0),
              ("aux.1", "ohem_cross_entropy", 1.0), ("detail", "detail_aggregation", 1.0)],
    "icnet_r50-d8": [("out", "cross_entropy", 1.0), ("aux.0", "cross_entropy", 0.4),
                     ("aux.1", "cross_entropy", 0.4)],
    # HyperSeg's trainer default, nn.CrossEntropyLoss(ignore_index=255) (the VOC config sets none)
    "hyperseg-l": [("out", "cross_entropy", 1.0)],
}

# ------------------------------------------------ counts re-derived from official code


def conv(cin, cout, k=1, bias=False, groups=1):
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def separable(cin, cout):
    """TorchSeg's SeparableConvBnRelu: depthwise 3x3 (no norm) + pointwise conv + BN."""
    return conv(cin, cin, 3, groups=cin) + conv(cin, cout) + bn(cout)


def xception_stage(cin, mid, blocks):
    """TorchSeg `xception.py` Block x blocks (expansion 4), the first strided with a separable
    projection."""
    n = 0
    for j in range(blocks):
        n += (separable(cin, 4 * mid) if j == 0 else 0) + separable(cin, mid) + separable(
            mid, mid) + separable(mid, 4 * mid)
        cin = 4 * mid
    return n


def count_xception39():
    """TorchSeg `furnace/base_model/xception.py` xception39: stem 3x3 3->8, stages of
    (4, 8, 4) blocks, middle widths (16, 32, 64)."""
    return conv(3, 8, 3) + bn(8) + xception_stage(8, 16, 4) + xception_stage(64, 32, 8) + \
        xception_stage(128, 64, 4)


def count_dfanet(variant, classes=19):
    """No reference code: the paper's Table 1 layer by layer, as segmentors/dfanet.py reads it:
    three XceptionA/B (stem 3x3 to 8; stages of [c/4, c/4, c] separable-convolution blocks with
    c = 48/96/192 (A) or 32/64/128 (B), repeats 4, 6, 4; the later two without stem and with
    concatenated inputs), fc attention (Linear c4 -> 1000, 1x1 conv-BN back), decoder width 32.
    1.83M / 1.10M, not the paper's 7.8M / 4.8M, which no reading of the table reaches (the
    arithmetic is in the model's docstring)."""
    c2, c3, c4 = {"a": (48, 96, 192), "b": (32, 64, 128)}[variant]

    def xception(ins, stem):
        n = conv(3, 8, 3) + bn(8) if stem else 0
        n += sum(xception_stage(i, c // 4, r) for i, c, r in zip(ins, (c2, c3, c4), (4, 6, 4)))
        return n + conv(c4, 1000, bias=True) + conv(1000, c4) + bn(c4)

    wider = (c2 + c4, c2 + c3, c3 + c4)
    decoder = 3 * (conv(c2, 32) + bn(32)) + 3 * (conv(c4, 32) + bn(32)) + conv(32, 32) + bn(32)
    return (xception((8, c2, c3), True) + 2 * xception(wider, False) + decoder
            + conv(32, classes, 1, True))


def count_bisenet_x39(classes=19):
    """TorchSeg `model/bisenet/cityscapes.bisenet.X39/network.py` + `seg_opr/seg_oprs.py`."""
    cbr = lambda i, o, k: conv(i, o, k) + bn(o)  # noqa: E731  (ConvBnRelu, no bias)
    spatial = cbr(3, 64, 7) + 2 * cbr(64, 64, 3) + cbr(64, 128, 1)
    arms = sum(cbr(c, 128, 3) + cbr(128, 128, 1) for c in (256, 128))
    heads = 2 * (cbr(128, 128, 3) + conv(128, classes, 1, bias=True)) + cbr(256, 64, 3) + conv(
        64, classes, 1, bias=True)
    ffm = cbr(256, 256, 1) + 2 * conv(256, 256)
    return (count_xception39() + spatial + cbr(256, 128, 1) + arms + 2 * cbr(128, 128, 3)
            + heads + ffm)


def count_basic_layer(cin, planes, blocks, stride):
    """A ResNet stage of BasicBlocks (torchvision / torchcv layout)."""
    n = 0
    for j in range(blocks):
        i = cin if j == 0 else planes
        n += conv(i, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
        if j == 0 and (stride != 1 or cin != planes):
            n += conv(cin, planes) + bn(planes)
    return n


def count_dfnet(variant):
    """torchcv / DNL-Semantic-Segmentation `model/backbone/dfnet/dfnet_models.py` (DFNetV1 /
    DFNetV2 without their unused classifier)."""
    stages = {"df1": [(64, 3, 2), (128, 3, 2), (256, 3, 2), (512, 1, 1)],
              "df2": [(64, 2, 2), (128, 1, 1), (128, 10, 2), (256, 1, 1), (256, 4, 2), (512, 2, 1)]}
    n, cin = conv(3, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64), 64
    for planes, blocks, stride in stages[variant]:
        n += count_basic_layer(cin, planes, blocks, stride)
        cin = planes
    return n


def count_dfseg(variant, classes=19):
    """SFNet `network/dfnet.py` DFSegnet (inner 128) + `network/nn/operators.py` PSPModule and
    Aux_Module (256 mid channels)."""
    reduce = conv(128, 128, 1, True) + conv(256, 128, 1, True) + conv(128, 128, 1, True)
    ppm = 4 * (conv(512, 128) + bn(128)) + conv(512 + 4 * 128, 128) + bn(128)
    fusion = 2 * conv(256, 128, 3)
    classifier = conv(128, 256, 3, True) + bn(256) + conv(256, classes, 1, True)
    return count_dfnet(variant) + reduce + ppm + fusion + classifier


# torchvision's published ResNet totals without the fc layer
RESNET18 = 11_689_512 - conv(512, 1000, bias=True)
RESNET101 = 44_549_160 - conv(2048, 1000, bias=True)


def count_gun(classes=19):
    """No reference code: our documented structure (segmentors/gun.py)."""
    return (RESNET18 + conv(128 + 512, 128, 3) + bn(128) + conv(128, classes, 1, True)
            + conv(64, 32, 3) + bn(32) + conv(32, 2, 1, True))


def count_rgpnet(classes=19):
    """No reference code: our documented structure (segmentors/rgpnet.py), ResNet-101."""
    adaptor = sum(conv(c, 128) + bn(128) for c in (256, 512, 1024, 2048)) + 3 * (
        conv(128, 128, 3) + bn(128))
    return RESNET101 + adaptor + 3 * (conv(128, 128, 3) + bn(128)) + conv(128, classes, 1, True)


# EfficientNet-PyTorch (lukemelas) published totals, 1000-class fc included
EFFICIENTNET_TOTAL = {"b1": 7_794_184, "b3": 12_233_232}
EFFICIENTNET_FEATURES = {"b1": (16, 24, 40, 112, 320), "b3": (24, 32, 48, 136, 384)}
EFFICIENTNET_HEAD = {"b1": 1280, "b3": 1536}


def count_efficientnet_hyperseg(variant, scales):
    """HyperSeg `hyperseg/models/backbones/efficientnet.py`: EfficientNet without its fc, plus a
    1x1 conv + BN narrowing each resolution's last feature whose scale is not 1."""
    n = EFFICIENTNET_TOTAL[variant] - conv(EFFICIENTNET_HEAD[variant], 1000, bias=True)
    for c, s in zip(EFFICIENTNET_FEATURES[variant], scales):
        if s != 1:
            n += conv(c, round(c * s)) + bn(round(c * s))
    return n


def weight_mapper_v1_0(c, levels):
    """`hyperseg_v1_0.py` WeightMapper on the C-channel signal: 1x1 C->C/2 + BN, then per extra
    level a 2x2 C/2->C/2 + BN and a 1x1 C->C/2 + BN."""
    return conv(c, c // 2) + bn(c // 2) + (levels - 1) * (
        conv(c // 2, c // 2, 2) + bn(c // 2) + conv(c, c // 2) + bn(c // 2))


def weight_mapper_v0_1(c, levels):
    """`hyperseg_v0_1.py` WeightMapper at full width: per extra level a 2x2 C->C conv + BN
    (`down_<i>`) and a 1x1 2C->C conv + BN (`flat_<i>`); its `out_conv.conv_<i>` are the weight
    layers, counted like v1_0's."""
    return (levels - 1) * (conv(c, c, 2) + bn(c) + conv(2 * c, c) + bn(c))


def count_hyperseg(scales, widths, shares, groups, classes=19, variant="b1",
                   kernels=(1, 1, 1, 3, 3), mapper_levels=2, mapper=weight_mapper_v1_0):
    """HyperSeg `hyperseg/models/hyperseg_v1_0.py` (and `models/hyperseg_v1_0_unify.py`, whose
    unified weight layer has the summed size; `hyperseg_v0_1.py` has the same decoder and weight
    layers around its own weight mapper): level l's input = 2 coordinates + encoder
    feature l (coarsest first, the image last) + previous level; a 1x1 level has BN(out) and
    in*out weights, an inverted residual (expansion 2) BN(hidden) x 2 + BN(out) and
    in*hidden + 9*hidden + hidden*out weights; `widths` None: each level as wide as its
    feature. `shares` are the signal channels the reference's divide_feature gives each weight
    layer (worked by hand in the comments of DERIVED); a weight layer is a grouped 1x1 conv from
    its share to ceil(weights / groups) * groups channels; `mapper` counts the weight mapper's
    other layers."""
    feats = ([3] + [round(c * s) for c, s in zip(EFFICIENTNET_FEATURES[variant], scales)])[::-1]
    widths = widths or feats
    n, prev, weights = 0, 0, []
    for level, k in enumerate(kernels):
        cin = prev + feats[level] + 2
        cout = classes if level == len(kernels) - 1 else widths[level]
        if k == 1:
            n += bn(cout)
            weights.append(cin * cout)
        else:
            hidden = 2 * cin
            n += 2 * bn(hidden) + bn(cout)
            weights.append(cin * hidden + 9 * hidden + hidden * cout)
        prev = cout
    if len(shares) < len(weights):  # unified tail
        weights = weights[:len(shares) - 1] + [sum(weights[len(shares) - 1:])]
    n += sum(share // g * (-(-w // g) * g) for w, share, g in zip(weights, shares, groups))
    return (count_efficientnet_hyperseg(variant, scales) + n
            + mapper(EFFICIENTNET_HEAD[variant], mapper_levels))


# name -> parameter count derived independently of our code (each function names its source)
DERIVED = {
    # -m: weights per layer (5248, 3008, 704, 2352, 4216), 40 units of 32 -> (13, 7, 4, 6, 10)
    "hyperseg-m": lambda: count_hyperseg((1, .25, .25, .25, .25), (64, 32, 16, 16, 16),
                                         (416, 224, 128, 192, 320), (32, 16, 8, 16, 4)),
    # -s: (4160, 992, 208, 868 + 2808 unified) -> units (18, 4, 2, 16)
    "hyperseg-s": lambda: count_hyperseg((1, .166, .2, .25, .4), (32, 16, 8, 8, 8),
                                         (576, 128, 64, 512), (32, 16, 8, 16)),
    # -l: hyperseg_v0_1.py with configs/train/vocsbd_efficientnet_b3_hyperseg-l.py (21 VOC
    # classes): weights (9408, 4488, 6624, 1716, 992, 902), rounded up to 16 and split by
    # divide_feature_legacy in 96 units of 16 -> (37, 17, 26, 6, 3, 7)
    "hyperseg-l": lambda: count_hyperseg([.25] * 5, None, (592, 272, 416, 96, 48, 112),
                                         [16] * 6, 21, "b3", (1, 1, 3, 3, 3, 3), 3,
                                         weight_mapper_v0_1),
    "dfanet-a": lambda: count_dfanet("a"),
    "dfanet-b": lambda: count_dfanet("b"),
    "gun": count_gun,
    "rgpnet": count_rgpnet,
    "bisenetv1_xception39": count_bisenet_x39,
    "dfnet-df1": lambda: count_dfseg("df1"),
    "dfnet-df2": lambda: count_dfseg("df2"),
}


def test_backbone_counts_match_their_references():
    from segops.models.backbones import build_backbone
    with torch.device("meta"):
        assert n_params(build_backbone("xception39")) == count_xception39()
        assert n_params(build_backbone("xception-a")) == (
            conv(3, 8, 3) + bn(8) + xception_stage(8, 12, 4) + xception_stage(48, 24, 6)
            + xception_stage(96, 48, 4) + conv(192, 1000, bias=True) + conv(1000, 192) + bn(192))
        assert n_params(build_backbone("df1")) == count_dfnet("df1")
        assert n_params(build_backbone("df2")) == count_dfnet("df2")
        for v in ("b1", "b3"):
            assert n_params(build_backbone(f"efficientnet-{v}-hyperseg")) == \
                count_efficientnet_hyperseg(v, [0.25] * 5)
        # torchvision vgg16_bn: 138,365,992 parameters (its docs), minus the three classifier
        # layers (25088 -> 4096 -> 4096 -> 1000, with biases)
        assert n_params(build_backbone("vgg16-bn")) == 138_365_992 - (
            conv(25088, 4096, bias=True) + conv(4096, 4096, bias=True)
            + conv(4096, 1000, bias=True))


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_parameter_count_matches_the_derived_count(name):
    assert n_params(meta_build(name)) == DERIVED[name]()


def test_hyperseg_l_derived_count_is_the_official_models():
    """39,680,458: `sum(p.numel() for p in model.parameters())` of the official model, built by
    `hyperseg_v0_1.hyperseg_efficientnet` with the VOC config's arguments and 21 classes."""
    assert DERIVED["hyperseg-l"]() == 39_680_458


# Models run forward and backward for real (the larger variants of a family are counted only;
# hyperseg-l is a network of its own, run at the 19 classes the checks below expect).
RUN = ["bisenetv1_r18-d32", "bisenetv2_fcn", "stdc1", "icnet_r18-d8", "bisenetv1_xception39",
       "dfnet-df1", "dfanet-b", "gun", ("rgpnet", dict(depth=18)), "hyperseg-s",
       ("hyperseg-l", dict(num_classes=19))]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_build(name, **kw):
    with torch.device("meta"):
        return models.build(name, **kw)


def test_registry_has_the_real_time_models():
    assert set(REAL_TIME_MODELS) <= set(models.list_models())
    from benchmarks.cases.models import LATENCY_MODELS  # every one gets a latency row
    assert set(LATENCY_MODELS) == set(REAL_TIME_MODELS)


@pytest.mark.parametrize("name", sorted(MMSEG))
def test_parameter_count_matches_mmseg_config(name):
    assert n_params(meta_build(name)) == MMSEG[name][1]


@pytest.mark.parametrize("name", sorted(MMSEG))
def test_state_dict_keys_and_shapes_match_mmseg(name):
    from tests.mmseg_reference import build_mmseg
    with torch.device("meta"):
        reference = build_mmseg(MMSEG[name][0])
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in meta_build(name).state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name", ["bisenetv2_fcn", "stdc1"])
def test_eval_forward_equals_mmseg_with_the_same_weights(name):
    """mmseg's checkpoint loads unchanged and gives the same logits (same operations in the same
    order, so only float reassociation may differ)."""
    from tests.mmseg_reference import build_mmseg
    reference = build_mmseg(MMSEG[name][0]).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in reference.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.1 * torch.randn(t.shape, generator=g) + (1.0 if "running_var" in key
                                                                    else 0.0))
    model = models.build(name).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 65, 97, generator=g)
    meta = [dict(img_shape=(65, 97), pad_shape=(65, 97), ori_shape=(65, 97))]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.encode_decode(x, meta))


@pytest.mark.parametrize("name", sorted(LOSS_WEIGHTS))
def test_loss_terms_follow_the_reference_config(name):
    terms = meta_build(name).loss_terms
    assert [(t.output, t.loss, t.weight) for t in terms] == LOSS_WEIGHTS[name]
    assert all(t.loss in LOSS_NAMES for t in terms)


@pytest.mark.parametrize("name", RUN, ids=lambda n: n if isinstance(n, str) else n[0])
def test_forward_backward_and_odd_size_eval(name):
    name, kw = (name, {}) if isinstance(name, str) else name
    torch.manual_seed(0)
    model = models.build(name, **kw)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 97, 131))
    assert out.shape == (1, 19, 97, 131) and torch.isfinite(out).all()

    model.train()
    res = model(torch.randn(2, 3, 128, 128))
    n_aux, extra = N_AUX.get(name, 0), EXTRA_OUTPUTS.get(name, ())
    assert set(res) == {"out", "aux", *extra}
    assert res["out"].shape == (2, 19, 128, 128)
    assert len(res["aux"]) == n_aux
    assert all(a.shape == (2, 19, 128, 128) for a in res["aux"])
    for key in extra:  # STDC's detail logits: one boundary channel at the input size
        assert res[key].shape == (2, 1, 128, 128)
    # every loss term's output exists; a stand-in loss (mean logit) reaches every head
    loss = sum(t.weight * t.select(res).float().mean() for t in model.loss_terms)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- summary


def test_summary_macs_match_torchvision_resnet18():
    """torchvision documents ResNet-18 (ResNet18_Weights.IMAGENET1K_V1) as 11,689,512 parameters
    and 1.81 "GFLOPS" at 224x224, counted as multiply-accumulates; our backbone is the same
    network without the 512 -> 1000 fc layer."""
    from segops.models import summary
    s = summary("resnet18", (224, 224))
    fc_params, fc_macs = 512 * 1000 + 1000, 512 * 1000
    assert s.params + fc_params == 11_689_512
    assert round((s.macs + fc_macs) / 1e9, 2) == 1.81


@pytest.mark.parametrize("variant, paper_gflops, ours_gmacs", [("a", 3.4, 2.95), ("b", 2.1, 1.57)])
def test_dfanet_compute_is_in_the_papers_convention(variant, paper_gflops, ours_gmacs):
    """DFANet's paper gives 3.4 (A) / 2.1 (B) "GFLOPs" at 1024x1024. Our reading of its Table 1
    comes below that in multiply-accumulates and far above it in FLOPs (2 per MAC): the paper
    counts MACs."""
    from segops.models import summary
    gmacs = summary(f"dfanet-{variant}", (1024, 1024)).macs / 1e9
    assert round(gmacs, 2) == ours_gmacs
    assert 0.7 * paper_gflops < gmacs < paper_gflops < 1.4 * paper_gflops < 2 * gmacs


def test_summary_counts_the_parameters_an_eval_forward_uses():
    from segops.models import summary
    s = summary("stdc1", (97, 131))
    model = meta_build("stdc1")
    assert s.params == MMSEG["stdc1"][1]
    # eval mode skips the auxiliary and detail heads, nothing else
    assert s.params_used == s.params - n_params(model.auxiliary_head)
    assert s.macs > 0


def test_summary_command_line(capsys):
    from segops.models.__main__ import main
    main(["bisenetv2_fcn", "--size", "64", "96"])
    out = capsys.readouterr().out
    assert out.startswith("bisenetv2_fcn at 64x96: 14,804,255 parameters") and "GMACs" in out


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", __import__("segops.models.backbones",
                                            fromlist=["list_backbones"]).list_backbones())
def test_backbone_builds_alone_and_runs(name):
    from segops.models.backbones import build_backbone
    with torch.device("meta"):
        net = build_backbone(name).eval()
        outs = net(torch.zeros(1, 3, 97, 131))
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    assert outs and all(o.dim() == 4 and o.shape[0] == 1 for o in outs)


def test_guided_upsampling_is_bilinear_without_offsets_and_follows_them():
    import torch.nn.functional as F
    from segops.nn import GuidedUpsampling
    gum = GuidedUpsampling()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    zero = torch.zeros(2, 2, 28, 36, dtype=torch.float64)
    torch.testing.assert_close(gum(x, zero), F.interpolate(x, size=(28, 36), mode="bilinear"))
    # at the same size, an offset of one pixel in x reads the right-hand neighbour
    shift = torch.zeros(2, 2, 7, 9, dtype=torch.float64)
    shift[:, 0] = 1.0
    torch.testing.assert_close(gum(x, shift)[..., :-1], x[..., 1:])
    with pytest.raises(ValueError, match="offsets"):
        gum(x, zero[:, :1])
