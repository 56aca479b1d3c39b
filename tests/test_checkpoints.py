"""segops.models.checkpoints: checkpoint layouts `build(name, pretrained=...)` accepts, for the
models that follow an official repository instead of mmseg (mmseg's own layout is checked
against mmseg itself in test_parity_mmseg.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from segops import models
from segops.models.checkpoints import KeyMap, load_pretrained, read_state_dict


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + (0.5 if key.endswith("var") else -0.5))
    return module


# ---------------------------------------------------------------- openseg.pytorch BaseOCNet
# A skeleton with the module tree of openseg's BaseOCNet (lib/models/nets/ocnet.py,
# lib/models/modules/base_oc_block.py, lib/models/backbones/resnet/resnet_models.py with
# deep_base=True), so its state_dict has the official key names; the head's forward follows
# the paper's Base-OC block, to check that every weight lands where it acts.

def _bn_relu(c):  # openseg's ModuleHelper.BNReLU
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


class _Bottleneck(nn.Module):
    def __init__(self, cin, planes, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, bias=False),
                                            nn.BatchNorm2d(planes * 4))


class _DeepBaseResNet(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.resinit = nn.Sequential()
        for i, (cin, cout) in enumerate(((3, 64), (64, 64), (64, 128)), 1):
            self.resinit.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, bias=False))
            self.resinit.add_module(f"bn{i}", nn.BatchNorm2d(cout))
        cin = 128
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), 1):
            layer = [_Bottleneck(cin, planes, True)]
            layer += [_Bottleneck(planes * 4, planes, False) for _ in range(n - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
            cin = planes * 4


class _OpensegObjectContext(nn.Module):
    def __init__(self, c, key, value):
        super().__init__()
        self.f_key = nn.Sequential(nn.Conv2d(c, key, 1), _bn_relu(key), nn.Conv2d(key, key, 1), _bn_relu(key))
        self.f_query = nn.Sequential(nn.Conv2d(c, key, 1), _bn_relu(key), nn.Conv2d(key, key, 1), _bn_relu(key))
        self.f_value = nn.Conv2d(c, value, 1)
        self.W = nn.Conv2d(value, c, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        query = self.f_query(x).flatten(2).transpose(1, 2)
        key = self.f_key(x).flatten(2)
        weights = torch.softmax(query @ key / key.shape[1] ** 0.5, dim=-1)
        context = weights @ self.f_value(x).flatten(2).transpose(1, 2)
        return self.W(context.transpose(1, 2).reshape(n, -1, h, w))


class _OpensegBaseOCNet(nn.Module):
    def __init__(self, blocks, num_classes):
        super().__init__()
        self.backbone = _DeepBaseResNet(blocks)
        self.oc_module_pre = nn.Sequential(nn.Conv2d(2048, 512, 3, padding=1), _bn_relu(512))
        self.oc_module = nn.Module()
        self.oc_module.stages = nn.ModuleList([_OpensegObjectContext(512, 256, 256)])
        self.oc_module.conv_bn_dropout = nn.Sequential(nn.Conv2d(1024, 512, 1), _bn_relu(512),
                                                       nn.Dropout2d(0.05))
        self.cls = nn.Conv2d(512, num_classes, 1)
        self.dsn = nn.Sequential(nn.Conv2d(1024, 512, 3, padding=1), _bn_relu(512),
                                 nn.Conv2d(512, num_classes, 1))

    def head(self, c4):
        x = self.oc_module_pre(c4)
        context = self.oc_module.stages[0](x)
        return self.cls(self.oc_module.conv_bn_dropout(torch.cat([context, x], dim=1)))


def test_ocnet_loads_an_openseg_checkpoint(tmp_path):
    official = _randomised(_OpensegBaseOCNet((3, 4, 6, 3), num_classes=19)).double().eval()
    path = tmp_path / "openseg_ocnet.pth"
    # openseg saves the DataParallel-wrapped model under "state_dict"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, path)
    # R50 for speed; fp64, as the sharp softmax of random weights amplifies rounding
    ours = models.build("ocnet_r101-d8", depth=50, pretrained=path).double().eval()

    assert torch.equal(ours.backbone.stem[4].weight, official.backbone.resinit.bn2.weight)
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, 5, 7, generator=gen, dtype=torch.float64)
             for c in (256, 512, 1024, 2048)]
    with torch.no_grad():
        torch.testing.assert_close(ours.decode_head(feats), official.head(feats[3]))
        torch.testing.assert_close(ours.auxiliary_head(feats), official.dsn(feats[2]))


# ---------------------------------------------------------------- official STLNet (STL block)

# A few keys of the official `STL(768)` module's state_dict (STLNet.py: ConvBNReLU keeps
# `conv` / `bn`, QCO_1d's conv1 and QCO_2d's f1 / out are Sequentials).
OFFICIAL_STL_KEYS = ["conv_start.conv.weight", "conv_start.bn.running_var",
                     "tem.qco.conv1.0.bn.weight", "tem.qco.f1.0.conv.weight", "tem.k.conv.weight",
                     "tem.out.bn.bias", "ptfem.conv.conv.weight", "ptfem.qco_6.out.1.bn.running_mean",
                     "ptfem.out.conv.weight"]


def test_stlnet_loads_the_official_stl_block_keys(tmp_path):
    with torch.device("meta"):
        model = models.build("stlnet_r101-d8", depth=18)  # R18: the same STL keys, faster
    state = {k: torch.randn(v.shape) if v.is_floating_point() else torch.zeros((), dtype=v.dtype)
             for k, v in model.state_dict().items()}
    official = {k.removeprefix("decode_head.stl."): v for k, v in state.items()}
    assert set(OFFICIAL_STL_KEYS) <= set(official)
    path = tmp_path / "stlnet.pth"
    torch.save({"model": official}, path)
    loaded = models.build("stlnet_r101-d8", depth=18, pretrained=path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------- the loader itself

def test_read_state_dict_unwraps_the_usual_containers():
    t = torch.ones(1)
    for checkpoint in ({"a.w": t}, {"state_dict": {"a.w": t}, "meta": {}}, {"model": {"module.a.w": t}}):
        assert list(read_state_dict(checkpoint)) == ["a.w"]


def test_load_pretrained_is_strict_but_tolerates_missing_bn_counters():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_pretrained(model, state)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_pretrained(model, {k: v for k, v in state.items() if k != "0.bias"})
    renamed = {k.replace("1.", "bn."): v for k, v in state.items()}
    load_pretrained(model, renamed, KeyMap("test", ((r"^bn\.", "1."),)))


def test_segmenter_patch_embedding_bias_is_an_option():
    """mmseg's ViT has no patch-embedding bias; the official Segmenter's (timm's) has one."""
    with torch.device("meta"):
        keys = set(models.build("segmenter_vit-t_mask").state_dict())
        official = set(models.build("segmenter_vit-t_mask", patch_bias=True).state_dict())
    assert official - keys == {"backbone.patch_embed.projection.bias"}


# ------------------------------- GALD-DGCNet, TorchSeg DFN, sssegmentation ISNet, GateNet, HyperSeg
# Official layouts built by renaming ours back. Each entry: build options (ResNet-18 variants:
# the same key names, fewer of them), the renames from our keys to the official ones (first
# match wins), and official keys read off the official module attribute paths, which the
# renamed state_dict must contain. The loaded model must hold every tensor of the model it came
# from under the same key (so the same outputs, which a forward checks where it is cheap: the
# HyperSeg models).

def _to_conv_bn(ours: str, official: str) -> list[tuple[str, str]]:
    """A ConvModule at `ours` -> `Sequential(conv, BN, ...)` at `official`."""
    return [(rf"^{ours}\.conv\.", rf"{official}.0."), (rf"^{ours}\.bn\.", rf"{official}.1.")]


_TO_GALD_DGCNET = ([(r"^backbone\.stem\.7\.", "bn1."), (r"^backbone\.stem\.", "conv1."),
                    (r"^backbone\.", "")]
                   + _to_conv_bn(r"decode_head\.(.+)", r"head.\1")
                   + [(r"^decode_head\.", "head.")]
                   + _to_conv_bn(r"auxiliary_head\.convs\.0", "dsn"))
_GALD_DGCNET_KEYS = ["conv1.0.weight", "conv1.6.weight", "bn1.running_var",
                     "layer1.0.downsample.1.weight", "head.conva.1.running_mean",
                     "head.bottleneck.3.bias", "dsn.0.bias", "dsn.1.running_var"]
_VGG16BN_SLICES = ((1, 0, 6), (2, 6, 13), (3, 13, 23), (4, 23, 33), (5, 33, 43))

OFFICIAL_LAYOUTS = {
    # GALDNet.py GALDNet: conv1 Sequential + bn1 stem, GALDHead at head, dsn with a ReLU
    # (classifier at 4)
    "gald_r101-d8": (
        dict(depth=18),
        [(r"^decode_head\.conv_seg\.", "head.bottleneck.3."),
         (r"^auxiliary_head\.conv_seg\.", "dsn.4.")] + _TO_GALD_DGCNET,
        _GALD_DGCNET_KEYS + ["head.a2block.down.0.weight", "head.a2block.long_relation.gn.bias",
                             "head.a2block.local_attention.dconv3.1.running_mean",
                             "dsn.4.weight"]),
    # DualGCNNet.py ResNet: DualGCNHead at head, dsn without a ReLU (classifier at 3)
    "dgcnet_r101-d8": (
        dict(depth=18),
        [(r"^decode_head\.conv_seg\.", "head.bottleneck.3."),
         (r"^auxiliary_head\.conv_seg\.", "dsn.3.")] + _TO_GALD_DGCNET,
        _GALD_DGCNET_KEYS + ["head.dualgcn.bn_theta.bias", "head.dualgcn.local.3.running_var",
                             "head.dualgcn.gcn_local_attention.out.0.bias", "dsn.3.weight"]),
    # TorchSeg voc.dfn.R101_v1c/network.py DFN: furnace resnet101(deep_stem=True) at backbone
    "dfn_r101": (
        dict(depth=18),
        [(r"^backbone\.stem\.7\.", "backbone.bn1."), (r"^backbone\.stem\.", "backbone.conv1."),
         (r"^decode_head\.cabs\.(\d+)\.", r"cabs.\1.channel_attention."),
         (r"^decode_head\.", "")],
        ["backbone.conv1.4.running_var", "backbone.bn1.weight", "backbone.layer2.0.conv1.weight",
         "global_context.1.bn.running_mean", "smooth_pre_rrbs.3.cbr.bn.running_mean",
         "cabs.1.channel_attention.fc.2.weight", "smooth_heads.0.conv.weight",
         "border_aft_rrbs.0.conv_refine.weight", "border_heads.2.rrb.cbr.bn.running_var"]),
    # sssegmentation isnet.py ISNet (+ imagelevel.py, semanticlevel.py, base SelfAttentionBlock)
    "isnet_r101-d8": (
        dict(depth=18),
        [(r"^backbone\.", "backbone_net."), (r"^decode_head\.conv_seg\.", "decoder_stage2.1."),
         (r"^decode_head\.decoder_stage1\.2\.", "decoder_stage1.4.")]
        + _to_conv_bn(r"decode_head\.decoder_stage1\.0", "decoder_stage1")
        + _to_conv_bn(r"decode_head\.(.+)", r"\1")
        + [(r"^auxiliary_head\.conv_seg\.", "auxiliary_decoder.4.")]
        + _to_conv_bn(r"auxiliary_head\.convs\.0", "auxiliary_decoder"),
        ["backbone_net.stem.4.running_var", "backbone_net.layer2.0.downsample.0.weight",
         "bottleneck.1.running_mean", "ilc_net.correlate_net.key_project.1.1.bias",
         "ilc_net.correlate_net.out_project.0.weight", "slc_net.bottleneck.1.running_var",
         "decoder_stage1.0.weight", "decoder_stage1.4.bias", "decoder_stage2.1.weight",
         "auxiliary_decoder.0.weight", "auxiliary_decoder.4.bias"]),
    # GateNet-RGB-Saliency model_GateNet_ResNet.py GateNet: the torchvision-style encoder and
    # the decoder modules all at the top level
    "gatenet_r50": (
        dict(depth=18), [(r"^(backbone|decode_head)\.", "")],
        ["conv1.weight", "bn1.running_var", "layer4.1.bn2.weight", "attention_feature1.5.weight",
         "dem1.0.down_conv.2.weight", "dem1.0.fuse.0.weight", "dem1.1.weight",
         "output4.0.weight", "out_res.6.bias"]),
    # model_GateNet_vgg16.py GateNet: vgg16_bn().features sliced into conv1 .. conv5
    "gatenet_vgg16": (
        dict(),
        [(r"^decode_head\.", "")]
        + [(rf"^backbone\.features\.{i}\.", f"conv{stage}.{i - start}.")
           for stage, start, stop in _VGG16BN_SLICES for i in range(start, stop)],
        ["conv1.0.weight", "conv2.4.weight", "conv3.8.running_var", "conv5.7.weight",
         "dem1.0.up_conv.bias", "dem4_1.1.running_var", "attention_feature5.0.weight"]),
    # hyperseg_v1_0.py HyperGen with configs/train/cityscapes_efficientnet_b1_hyperseg-m.py
    "hyperseg-m": (
        dict(), [(r"^decoder\.(level_[012])\.([01])\.", r"decoder.\1.0.\2.")],
        ["backbone._conv_stem.weight", "backbone._feat_fc_1.1.running_var",
         "decoder.coord512_1024", "decoder.coord32_32", "decoder.level_1.0.0.signal2weights.weight",
         "decoder.level_2.0.1.running_var", "decoder.level_3.0.bn3.weight",
         "decoder.level_4.0.signal2weights.weight", "weight_mapper.up_blocks.0.1.running_var"]),
    # hyperseg_v1_0_unify.py with configs/train/cityscapes_efficientnet_b1_hyperseg-s.py
    "hyperseg-s": (
        dict(), [(r"^decoder\.(level_blocks\.[012])\.1\.", r"decoder.\1.0.1.")],
        ["decoder.coord768_1536", "decoder.coord48_48", "decoder.level_blocks.1.0.1.bias",
         "decoder.level_blocks.3.0.bn1.running_mean",
         "decoder.weight_blocks.3.signal2weights.weight", "weight_mapper.in_conv.0.weight"]),
    # hyperseg_v0_1.py HyperGen with configs/train/vocsbd_efficientnet_b3_hyperseg-l.py: the
    # official keys are ours, nothing to rename
    "hyperseg-l": (
        dict(), [],
        ["backbone._blocks.25._se_expand.bias", "backbone._feat_fc_4.1.running_var",
         "decoder.level_0.0.1.running_mean", "decoder.level_1.0.1.weight",
         "decoder.level_2.0.conv.1.1.bias", "decoder.level_5.0.conv.2.1.running_var",
         "weight_mapper.down_1.0.weight", "weight_mapper.flat_0.1.running_var",
         "weight_mapper.out_conv.conv_5.weight"]),
}


def _offset(module: nn.Module) -> nn.Module:
    """Each floating tensor shifted by its own constant, so that tensors of one shape and
    initial value (BN weights, biases, statistics) differ and a swapped pair would show."""
    with torch.no_grad():
        for i, (key, t) in enumerate(module.state_dict(keep_vars=True).items()):
            if t.is_floating_point() and ".coord" not in key:
                t.add_(1e-3 * (i + 1))
    return module


@pytest.mark.parametrize("name", list(OFFICIAL_LAYOUTS))
def test_official_repository_layout_loads(name):
    options, to_official, official_keys = OFFICIAL_LAYOUTS[name]
    source = _offset(models.build(name, **options)).eval()
    state = source.state_dict()
    official = KeyMap("segops -> official", tuple(to_official)).apply(state)
    assert len(official) == len(state)
    assert set(official_keys) <= set(official)
    loaded = models.build(name, pretrained={"state_dict": official}, **options).eval()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    if name.startswith("hyperseg"):
        img = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(loaded(img), source(img), rtol=0, atol=0)


def test_hyperseg_l_weight_layers_have_the_official_shapes():
    """hyperseg_v0_1.py's `weight_mapper.out_conv` for the VOC config, read off the official
    model: each level's weight count rounded up to 16 from its slice of the 1536-channel signal
    (divide_feature_legacy), 16 groups."""
    with torch.device("meta"):
        state = models.build("hyperseg-l").state_dict()
    official = [(9408, 37), (4496, 17), (6624, 26), (1728, 6), (992, 3), (912, 7)]
    assert [tuple(state[f"weight_mapper.out_conv.conv_{i}.weight"].shape)
            for i in range(6)] == [(out, share, 1, 1) for out, share in official]


def test_hyperseg_coordinate_buffers_hold_the_official_grids():
    """hyperseg_v1_0.py MultiScaleDecoder.cache_image_coordinates: for each config resolution
    and level l, `coord<h>_<w>` at (h, w) = resolution // 2**l, channel 0 the x coordinate
    (linspace over the width), channel 1 y, both from -1 to 1, as (1, 2, h, w) fp32."""
    with torch.device("meta"):
        names = {k for k in models.build("hyperseg-m").state_dict() if ".coord" in k}
    assert names == {f"decoder.coord{512 // 2 ** i}_{r // 2 ** i}"
                     for r in (512, 1024) for i in range(5)}
    grid = models.build("hyperseg-m").decoder.coord32_64
    assert grid.shape == (1, 2, 32, 64) and grid.dtype == torch.float32
    assert torch.equal(grid[0, 0], torch.linspace(-1, 1, 64).expand(32, 64))
    assert torch.equal(grid[0, 1], torch.linspace(-1, 1, 32)[:, None].expand(32, 64))
