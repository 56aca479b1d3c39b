"""Model zoo part 3 (issue 17): context heads with segops operators inside, and the layers they
brought (`segops.nn.PSAMask`, ...).

Expected parameter counts never come from the code under test:
- psanet_r{50,101}-d8: mmseg 1.2.2 `configs/psanet/psanet_r{50,101}-d8_4xb2-40k_cityscapes-
  512x1024.py` built live (tests/mmseg_reference.py, meta device) and counted: 59,138,694 and
  78,130,822; the test also compares the state_dict keys and shapes with mmseg's live.
- The other counts were summed by hand from the reference code's layer shapes (conv
  k*k*Cin*Cout [+Cout bias where the reference's conv keeps it], BN 2*C); backbones: mmseg
  ResNetV1c-101 42,519,392 (stem 64), openseg deep-base ResNet-101 42,623,936 (stem 128), as
  in tests/test_models_cnn.py.
  * ocnet-asp_r101-d8: openseg.pytorch `lib/models/nets/ocnet.py` AspOCNet +
    `modules/asp_oc_block.py`, `base_oc_block.py` (BaseOC_Context_Module, scale 2): backbone +
    3x3 2048->512 (bias) 9,438,720 + context 3x3 512->256 (bias) 1,180,416 + object context
    (key/value 128) 165,760 + BN 512 + 1x1 131,584 + 3 dilated 3,540,480 + fuse 1280->512
    656,384 + cls 9,747 + dsn 4,729,875 = 62,477,414.
  * ocnet-pyramid_r101-d8: OCNet.pytorch `ResNet101PyramidOC` + `pyramid_oc_block.py`
    (up_dr): backbone + 3x3 9,438,720 + 4 stages x 921,600 (key 256, value 512, W 512->512) +
    up_dr 512->2048 1,054,720 + fuse 4096->512 2,098,688 + cls 9,747 + dsn 4,729,875
    = 63,642,086.
  * isnet_r101-d8: sssegmentation `segmentors/isnet/*.py`, `base/selfattention.py`,
    `configs/isnet/base_cfg.py` (backbone ResNetV1c-101, stem 64): bottleneck 9,438,208 + ILC
    (attention 921,088 + 3x3 1024->512 4,719,616) + SLC (658,944 + 4,719,616) + decoder_stage1
    272,915 + cls 9,747 + auxiliary 3x3 1024->512 + cls 4,729,363 = 67,988,889.
  * gald_r101-d8 / dgcnet_r101-d8: lxtGH/GALD-DGCNet `libs/models/GALDNet.py`,
    `DualGCNNet.py` (deep stem 128, so the openseg backbone count): conva 9,438,208 + convb
    2,360,320 + bottleneck 2560->512 11,797,504 + cls 9,747 + dsn 4,729,875, with GALDBlock
    (down 6,144 + CGNL 410,624 + local 18,432) = 71,394,790, and DualGCN 1,547,008 (SpatialGCN
    592,640, local 16,896, final 525,312, phi/theta/adj/wg/conv3 412,160) = 72,506,598.
  * dfn_r101: TorchSeg `model/dfn/voc.dfn.R101_v1c/network.py`, `furnace/seg_opr/seg_oprs.py`
    (ResNet-101, deep stem 128: 42,623,936): RRB(cin, c) = cin*c + 18c^2 + 2c; smooth pre-RRBs
    20,844,544, aft-RRBs 19,927,040, CABs 4 x 787,456, heads 4 x 617,500 (RRB 512 -> 171, 1x1
    171 -> 19), global context 1,049,600, border pre-RRBs 112,560, aft-RRBs 33,684, heads
    6,700 = 90,217,888.
  * gatenet_r50 / gatenet_vgg16: GateNet-RGB-Saliency `model_GateNet_ResNet.py`,
    `model_GateNet_vgg16.py`, `multi_scale_module.py` (FoldConv_aspp). Encoders: torchvision
    ResNet-50 25,557,032 - fc 2,049,000 = 23,508,032; torchvision VGG16-BN 138,365,992 -
    classifier 123,642,856 = 14,723,136. ResNet decoder: gates 16,417,168, dem1 (Fold-ASPP
    81,026,055 + BN/PReLU 1,025) + dem2..5 3,134,980, outputs 1,587,269, out_res (1025 -> 256)
    2,955,267 = 128,629,796. VGG decoder: gates 7,790,416, dem1 73,949,192 + dem2..5
    1,568,164, outputs 1,568,453, dem*_1 286,181, out_res (161 -> 64) 130,563
    = 100,016,105.
  * deeplabv3-sd_r101-d8: mmseg deeplabv3_r101-d8 (87,105,158, tests/test_models_cnn.py) plus
    (2r-1)^2 per dilated conv (Wang & Ji, KDD 2018, separable-and-shared smoothing): stage 3
    22 x 3^2, stage 4 3^2 + 2 x 7^2, ASPP 23^2 + 47^2 + 71^2 = 8,084 -> 87,113,242.
- Paper-only models (no reference code: the counts are of our documented structure in
  segops/models/heads/paper_heads.py), each = mmseg ResNetV1c-101 + auxiliary FCN head
  (44,884,083) + head (classifier and coarse classifier 9,747 each):
  * acfnet: mmseg ASPP 42,211,328 + coarse + acf_reduce 131,584 + 3x3 fuse 768->512 3,539,968
    + cls = 90,786,457.
  * hmanet: in_conv 9,438,208 + class attention 658,944 + ISA 1,842,176 + fuse 1536->512
    787,456 + cls + coarse = 57,630,361.
  * reconet: in_conv + 1x1 fuse 525,312 + channel generator 512 -> 64 x 512 16,809,984 +
    H/W generators 65,664 + lambdas 64 + cls = 71,733,062.
  * ordnet: in_conv + 3x3 fuse 4,719,616 + middle-range ISA relation 921,088 + NonLocal2d
    526,080 + reweight 513 + cls = 60,499,335.
  * gpsnet: in_conv + 3x3 fuse + 6 dense dilated paths 5,752,320 + gate 3,078 + path fuse
    656,384 + cls = 65,463,436.
"""
from __future__ import annotations

import pytest
import torch

from segops import models
from segops.nn import PSAMask
from tests.utils import assert_fused_model_close, require_backend

REFERENCE_PARAMS = {
    "psanet_r50-d8": 59_138_694,
    "psanet_r101-d8": 78_130_822,
    "ocnet-asp_r101-d8": 62_477_414,
    "ocnet-pyramid_r101-d8": 63_642_086,
    "isnet_r101-d8": 67_988_889,
    "gald_r101-d8": 71_394_790,
    "dgcnet_r101-d8": 72_506_598,
    "dfn_r101": 90_217_888,
    "gatenet_r50": 128_629_796,
    "gatenet_vgg16": 100_016_105,
    "deeplabv3-sd_r101-d8": 87_113_242,
    "acfnet_r101-d8": 90_786_457,
    "hmanet_r101-d8": 57_630_361,
    "reconet_r101-d8": 71_733_062,
    "ordnet_r101-d8": 60_499_335,
    "gpsnet_r101-d8": 65_463_436,
}

# config name -> mmseg config (relative to mmseg's bundled configs) for the key comparison.
MMSEG_CONFIGS = {
    "psanet_r50-d8": "psanet/psanet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
    "psanet_r101-d8": "psanet/psanet_r101-d8_4xb2-40k_cityscapes-512x1024.py",
}

# segops operators each model runs (for the backend-switch test); models not listed run none.
MODEL_OPS = {
    "ocnet-asp_r101-d8": ("disentangled_non_local",),
    "ocnet-pyramid_r101-d8": ("interlaced_sparse_attention",),
    "isnet_r101-d8": ("disentangled_non_local",),
    "acfnet_r101-d8": ("disentangled_non_local",),
    "hmanet_r101-d8": ("disentangled_non_local", "interlaced_sparse_attention"),
    "ordnet_r101-d8": ("interlaced_sparse_attention", "disentangled_non_local"),
}

# Forward/backward configurations: one variant per model (psanet at R50), with `depth=18`
# (ResNet-18 widths, same head structure) wherever the factory takes a depth.
SMALL = {name: ({} if name == "gatenet_vgg16" else dict(depth=18))
         for name in REFERENCE_PARAMS if name != "psanet_r101-d8"}
# GALD's unpadded stride-2 depthwise convs need a stage-4 map of at least 15 x 15.
EVAL_SIZE = {"gald_r101-d8": (121, 153)}
TRAIN_SIDE = 128  # the train step: batch 2 at 128 x 128
N_AUX = {"isnet_r101-d8": 2, "dfn_r101": 3, "acfnet_r101-d8": 2, "hmanet_r101-d8": 2}
CLASSES = {"gatenet_r50": 1, "gatenet_vgg16": 1}  # saliency
# parameters the reference builds but never uses (kept for its keys)
UNUSED_PARAMETERS = {"dfn_r101": ("decode_head.border_aft_rrbs.0.",)}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_build(name, **kw):
    with torch.device("meta"):
        return models.build(name, **kw)


# ----------------------------------------------------------------------------- PSAMask


def psa_mask_loops(x, psa_type, mask_size):
    """mmcv's psamask_{collect,distribute}_forward kernels, written as the loops they are."""
    h_mask, w_mask = mask_size
    half_h, half_w = (h_mask - 1) // 2, (w_mask - 1) // 2
    n, _, h, w = x.shape
    out = x.new_zeros(n, h * w, h, w)
    for i in range(h):
        for j in range(w):
            for hi in range(max(0, half_h - i), min(h_mask, h + half_h - i)):
                for wi in range(max(0, half_w - j), min(w_mask, w + half_w - j)):
                    ty, tx = hi + i - half_h, wi + j - half_w
                    value = x[:, hi * w_mask + wi, i, j]
                    if psa_type == "collect":
                        out[:, ty * w + tx, i, j] = value
                    else:
                        out[:, i * w + j, ty, tx] = value
    return out


@pytest.mark.parametrize("psa_type", ["collect", "distribute"])
@pytest.mark.parametrize("size,mask", [((5, 7), (9, 13)), ((6, 4), (5, 3)), ((3, 3), (4, 6))],
                         ids=["full-window", "window-smaller-than-map", "even-window"])
def test_psa_mask_matches_mmcv_loops(psa_type, size, mask):
    x = torch.randn(2, mask[0] * mask[1], *size, dtype=torch.float64, requires_grad=True)
    got = PSAMask(psa_type, mask)(x)
    torch.testing.assert_close(got, psa_mask_loops(x.detach(), psa_type, mask), rtol=0, atol=0)
    # the backward scatters back onto the window entries that were used (mmcv's backward)
    weight = torch.randn_like(got)
    (got * weight).sum().backward()
    xg = x.detach().clone().requires_grad_(True)
    (psa_mask_loops(xg, psa_type, mask) * weight).sum().backward()
    torch.testing.assert_close(x.grad, xg.grad, rtol=0, atol=0)


def test_psa_mask_rejects_wrong_channels():
    with pytest.raises(ValueError, match="mask size"):
        PSAMask("collect", (3, 3))(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="psa_type"):
        PSAMask("both", 3)


def test_psanet_head_matches_mmseg():
    """mmseg's own PSAHead needs mmcv's compiled PSAMask; with our layer put in its place the
    whole mmseg model (R18 widths) gives our model's output exactly, from the same weights."""
    from tests.mmseg_reference import _registry, model_config
    _registry()
    import mmseg.models.decode_heads.psa_head as mmseg_psa_head
    cfg = model_config(MMSEG_CONFIGS["psanet_r50-d8"])
    cfg.backbone.depth = 18
    cfg.decode_head.update(in_channels=512, channels=128)
    cfg.auxiliary_head.update(in_channels=256, channels=64)
    original = mmseg_psa_head.PSAMask
    mmseg_psa_head.PSAMask = PSAMask
    try:
        ref = _registry().build(cfg).eval()
    finally:
        mmseg_psa_head.PSAMask = original
    ours = models.build("psanet_r50-d8", depth=18).eval()
    ours.load_state_dict(ref.state_dict())
    for size in ((65, 65), (66, 81)):  # both shrink branches of mmseg's size rule
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = ref.encode_decode(x, [dict(img_shape=size)])
            got = ours(x)
        assert expected.std() > 0
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- head parts


def _softmax_attention(q, k, v, scale):
    """(C, L) query/key, (Cv, L) value -> (Cv, L)."""
    return v @ torch.softmax(scale * q.t() @ k, dim=-1).t()


@pytest.mark.parametrize("size", [(13, 17), (4, 9)])
@pytest.mark.parametrize("regions", [1, 3, 6])
def test_pyramid_region_attention_matches_openseg_cells(size, regions):
    """openseg's _PyramidSelfAttentionBlock loop: cells of floor(H/s) x floor(W/s), the last
    row and column taking the remainder (4 < 6 rows: all rows in the last cell row)."""
    from segops.nn.interlaced_sparse_attention import pyramid_region_attention
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, *size, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 5, *size, generator=g, dtype=torch.float64)
    got = pyramid_region_attention(q, k, v, regions, scale=0.7, backend="reference")
    h, w = size
    sh, sw = h // regions, w // regions
    expected = torch.empty_like(got)
    for i in range(regions):
        for j in range(regions):
            rows = slice(i * sh, h if i == regions - 1 else (i + 1) * sh)
            cols = slice(j * sw, w if j == regions - 1 else (j + 1) * sw)
            for b in range(2):
                cell = [t[b, :, rows, cols] for t in (q, k, v)]
                if cell[0].numel() == 0:
                    continue
                flat = [t.reshape(t.shape[0], -1) for t in cell]
                expected[b, :, rows, cols] = _softmax_attention(*flat, 0.7).reshape(cell[2].shape)
    torch.testing.assert_close(got, expected)


def test_isnet_class_centres_match_sssegmentation_loop():
    from segops.models.heads.isnet_head import class_centres_per_pixel
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    logits[1, 3] = -10.0  # a class no pixel takes
    expected = torch.zeros(2, 35, 4, dtype=torch.float64)
    for b in range(2):
        f, p = feats[b].reshape(4, -1).t(), logits[b].reshape(6, -1).t()
        label = p.argmax(1)
        for cls in range(6):
            mask = label == cls
            if mask.any():
                weight = torch.softmax(p[:, cls][mask], dim=0)
                expected[b][mask] = (f[mask] * weight[:, None]).sum(0)
    expected = expected.reshape(2, 5, 7, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(class_centres_per_pixel(feats, logits), expected)


def test_pafem_matches_reference_formula():
    """Each dilated branch of PAFEM is `y + gamma * (v softmax(q^T k)^T)` (the reference's
    bmm formulation), computed here from the layer's own weights."""
    import torch.nn.functional as F
    from segops.nn import PAFEM
    g = torch.Generator().manual_seed(0)
    layer = PAFEM(6, 32).double().eval()
    with torch.no_grad():
        for attention in layer.attentions:
            attention.gamma.scale.fill_(0.7)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        down = layer.down_conv(x)
        branches = [layer.conv1(down)]
        for conv, att in zip(layer.dilated, layer.attentions):
            y = conv(down)
            n, c, h, w = y.shape
            q = att.query_conv(y).view(n, -1, h * w).permute(0, 2, 1)
            k = att.key_conv(y).view(n, -1, h * w)
            v = att.value_conv(y).view(n, -1, h * w)
            out = torch.bmm(v, torch.softmax(torch.bmm(q, k), dim=-1).permute(0, 2, 1))
            branches.append(0.7 * out.view(n, c, h, w) + y)
        pooled = F.interpolate(layer.conv5(F.adaptive_avg_pool2d(down, 1)), size=(5, 7),
                               mode="bilinear")
        expected = layer.fuse(torch.cat(branches + [pooled], dim=1))
    torch.testing.assert_close(got, expected)


def test_class_centres_and_context_match_formulas():
    from segops.models.heads.paper_heads import class_centres, class_context
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    z, f = logits.flatten(2), feats.flatten(2)
    centres = torch.einsum("nkl,ncl->nck", torch.softmax(z, dim=2), f)  # spatial softmax
    torch.testing.assert_close(class_centres(logits, feats, "reference")[..., 0], centres)
    context = torch.einsum("nkl,nck->ncl", torch.softmax(z, dim=1), centres)  # class softmax
    got = class_context(logits, centres[..., None], "reference")
    torch.testing.assert_close(got, context.view(2, 3, 6, 7))


def test_smoothed_dilated_conv():
    """Identity-initialised it is the plain dilated conv; with any smoothing kernel it is a
    depthwise conv with that one kernel on every channel, then the dilated conv."""
    import torch.nn.functional as F
    from segops.nn import SmoothedDilatedConv2d, smooth_dilated_convs
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, 3, padding=3, dilation=3).double()
    net = smooth_dilated_convs(torch.nn.Sequential(plain, torch.nn.Conv2d(6, 2, 1)).double())
    conv = net[0]
    assert isinstance(conv, SmoothedDilatedConv2d) and conv.smooth.shape == (5, 5)
    assert type(net[1]) is torch.nn.Conv2d  # not dilated: left alone
    x = torch.randn(2, 4, 11, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conv(x), plain(x))
    with torch.no_grad():
        conv.smooth.copy_(torch.randn(5, 5, generator=g, dtype=torch.float64))
    depthwise = F.conv2d(x, conv.smooth.expand(4, 1, 5, 5), padding=2, groups=4)
    torch.testing.assert_close(conv(x), plain(depthwise))


# ----------------------------------------------------------------------------- the zoo


def test_registered():
    assert set(REFERENCE_PARAMS) | set(SMALL) <= set(models.list_models())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count(name):
    assert n_params(meta_build(name)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MMSEG_CONFIGS))
def test_state_dict_matches_mmseg(name):
    from tests.mmseg_reference import build_mmseg
    with torch.device("meta"):
        ref = build_mmseg(MMSEG_CONFIGS[name])
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in meta_build(name).state_dict().items()}
    assert got == expected


def _flat_outputs(res: dict) -> dict:
    """{"out": t, "aux.0": t, ..., "border.0": t, ...} of a train-mode output dict."""
    flat = {}
    for key, value in res.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}.{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_odd_size_and_train_step(name):
    model = models.build(name, **SMALL[name])
    classes = CLASSES.get(name, 19)
    model.eval()
    size = EVAL_SIZE.get(name, (97, 131))
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, classes, *size) and torch.isfinite(out).all()

    model.train()
    side = TRAIN_SIDE
    res = model(torch.randn(2, 3, side, side))
    assert res["out"].shape == (2, classes, side, side)
    assert len(res["aux"]) == N_AUX.get(name, 1)
    outputs = _flat_outputs(res)
    terms = model.loss_terms
    # every output is supervised, and every term selects a logit map at the input size
    assert {t.output for t in terms} == set(outputs)
    loss = 0.0
    for term in terms:
        selected = term.select(res)
        assert selected.shape[0] == 2 and selected.shape[2:] == (side, side)
        loss = loss + term.weight * selected.square().mean()
    loss.backward()
    unused = UNUSED_PARAMETERS.get(name, ())
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith(unused)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert next(model.backbone.parameters()).grad.abs().sum() > 0  # the first conv


# (model, build kwargs, segops operators it runs): the smallest variant of each model with a
# fused layer; GateNet only has one with context="pafem".
BACKEND_CASES = [(n, SMALL[n], ops) for n, ops in sorted(MODEL_OPS.items())] + [
    ("gatenet_r50", dict(depth=18, context="pafem"), ("disentangled_non_local",))]


@pytest.mark.parametrize("name,kw,ops", BACKEND_CASES, ids=[c[0] for c in BACKEND_CASES])
def test_backend_reference_vs_fused_cpu(name, kw, ops):
    """backend="cpu" (fused kernels, fp32) against the same weights in fp64 on the reference
    backend, under the tolerance rule of tests/utils.py."""
    for op in ops:
        require_backend(op, "cpu", "cpu", torch.float32)
    assert_fused_model_close(models.build, name, size=(49, 49), **kw)
