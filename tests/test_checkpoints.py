"""segops.models.checkpoints: checkpoint layouts `build(name, pretrained=...)` accepts, for the
models that follow an official repository instead of mmseg (mmseg's own layout is checked
against mmseg itself in test_parity_mmseg.py)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segops import models
from segops.models.checkpoints import (KeyMap, load_pretrained, official_key_map, read_state_dict,
                                       unfold_order)


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


# ------------------------------------- official layouts written out: OCNet ASP / Pyramid, TorchSeg, SeMask
# Each test lays our model's state_dict out under the official module paths (segops module ->
# official module, written out below from the official code), checks that a few keys listed by
# instantiating the official modules (scratch scripts, not kept) are among them, and that
# `build(..., pretrained=<that checkpoint>)` loads it strictly back to the same tensors.

def _official_layout(state: dict, paths: dict) -> dict:
    """`state` renamed module by module with `paths` (segops module -> official module; the
    longest matching module path wins)."""
    by_length = sorted(paths, key=len, reverse=True)

    def rename(key):
        module = next((m for m in by_length if key.startswith(m + ".")), None)
        return key if module is None else paths[module] + key[len(module):]
    return {rename(k): v for k, v in state.items()}


def _assert_loads_back(tmp_path, name, official: dict, expected: dict, container="state_dict",
                       **build_kw):
    path = tmp_path / f"{name}.pth"
    torch.save({container: official, "meta": {}}, path)
    loaded = models.build(name, pretrained=path, **build_kw).state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def _random_state(name, **build_kw) -> dict:
    return _randomised(models.build(name, **build_kw)).state_dict()


_OPENSEG_STEM = {f"backbone.stem.{i}": f"backbone.resinit.{layer}"
                 for i, layer in ((0, "conv1"), (1, "bn1"), (3, "conv2"), (4, "bn2"), (6, "conv3"),
                                  (7, "bn3"))}


def _openseg_conv_bn(ours: str, official: str) -> dict:
    """A segops ConvModule -> openseg's Sequential(Conv2d, BNReLU) (torchbn: BNReLU is
    Sequential(BatchNorm2d, ReLU))."""
    return {f"{ours}.conv": f"{official}.0", f"{ours}.bn": f"{official}.1.0"}


def _openseg_attention(ours: str, official: str) -> dict:
    """segops' ObjectContextAttention -> openseg's SelfAttentionBlock2D (f_key / f_query:
    Conv2d, BNReLU, Conv2d, BNReLU)."""
    paths = {ours: official}
    for branch in ("f_key", "f_query"):
        for i in range(2):
            paths.update({f"{ours}.{branch}.{i}.conv": f"{official}.{branch}.{2 * i}",
                          f"{ours}.{branch}.{i}.bn": f"{official}.{branch}.{2 * i + 1}.0"})
    return paths


# keys of openseg's AspOCNet (bn_type torchbn), from the official module
OPENSEG_ASP_KEYS = ["context.0.weight", "context.1.0.running_var", "context.2.context.0.bias",
                    "context.2.context.2.stages.0.f_key.3.0.weight",
                    "context.2.context.2.stages.0.f_query.2.bias", "context.2.context.2.stages.0.W.weight",
                    "context.2.context.2.conv_bn_dropout.0.0.running_mean", "context.2.conv2.0.weight",
                    "context.2.conv5.1.0.bias", "context.2.conv_bn_dropout.1.0.weight", "cls.bias",
                    "dsn.1.0.weight", "dsn.2.weight"]


def test_ocnet_asp_loads_an_openseg_checkpoint(tmp_path):
    paths = {**_OPENSEG_STEM, **_openseg_conv_bn("decode_head.oc_module_pre", "context"),
             **_openseg_conv_bn("decode_head.oc_module.context.0", "context.2.context"),
             **_openseg_attention("decode_head.oc_module.context.1.stages.0",
                                  "context.2.context.2.stages.0"),
             "decode_head.oc_module.context.1.bn": "context.2.context.2.conv_bn_dropout.0.0",
             **_openseg_conv_bn("decode_head.oc_module.conv2", "context.2.conv2"),
             **{k: v for i in range(3) for k, v in _openseg_conv_bn(
                 f"decode_head.oc_module.dilated.{i}", f"context.2.conv{i + 3}").items()},
             **_openseg_conv_bn("decode_head.oc_module.conv_bn_dropout", "context.2.conv_bn_dropout"),
             "decode_head.conv_seg": "cls", **_openseg_conv_bn("auxiliary_head.convs.0", "dsn"),
             "auxiliary_head.conv_seg": "dsn.2"}
    ours = _random_state("ocnet-asp_r101-d8", depth=18)  # R18: the same head keys, faster
    official = _official_layout(ours, paths)
    assert set(OPENSEG_ASP_KEYS) <= set(official)
    assert not [k for k in official if k.startswith(("decode_head", "auxiliary_head"))]
    _assert_loads_back(tmp_path, "ocnet-asp_r101-d8", official, ours, depth=18)


# keys of openseg's PyramidOCNet (commit 5ec9f10, torchbn), from the official module; its
# `context.up_dr` is commented out there (OCNet.pytorch's names)
OPENSEG_PYRAMID_KEYS = ["conv_3x3.0.weight", "conv_3x3.1.0.running_mean",
                        "context.stages.0.f_key.0.weight", "context.stages.3.f_query.3.0.bias",
                        "context.stages.2.f_value.weight", "context.stages.1.W.bias",
                        "context.conv_bn_dropout.0.weight", "context.conv_bn_dropout.1.0.running_var",
                        "cls_head.weight", "dsn_head.0.bias", "dsn_head.1.0.weight", "dsn_head.3.weight"]


def test_ocnet_pyramid_loads_an_openseg_layout_checkpoint(tmp_path):
    paths = {**_OPENSEG_STEM, **_openseg_conv_bn("decode_head.oc_module_pre", "conv_3x3"),
             **{k: v for i in range(4) for k, v in _openseg_attention(
                 f"decode_head.oc_module.stages.{i}", f"context.stages.{i}").items()},
             **_openseg_conv_bn("decode_head.oc_module.up_dr", "context.up_dr"),
             **_openseg_conv_bn("decode_head.oc_module.conv_bn", "context.conv_bn_dropout"),
             "decode_head.conv_seg": "cls_head", **_openseg_conv_bn("auxiliary_head.convs.0", "dsn_head"),
             "auxiliary_head.conv_seg": "dsn_head.3"}
    ours = _random_state("ocnet-pyramid_r101-d8", depth=18)
    official = _official_layout(ours, paths)
    assert set(OPENSEG_PYRAMID_KEYS) <= set(official)
    assert not [k for k in official if k.startswith(("decode_head", "auxiliary_head"))]
    _assert_loads_back(tmp_path, "ocnet-pyramid_r101-d8", official, ours, depth=18)


# keys of TorchSeg's BiSeNet(19) (cityscapes.bisenet.X39), from the official module: the same
# names as segops'
TORCHSEG_BISENET_X39_KEYS = ["context_path.conv1.conv.weight",
                             "context_path.layer1.0.proj.point_wise_cbr.bn.running_mean",
                             "context_path.layer2.3.residual_branch.2.conv1.weight",
                             "spatial_path.conv_7x7.conv.weight", "global_context.1.bn.running_var",
                             "arms.1.channel_attention.1.bn.weight", "refines.0.conv.weight",
                             "heads.2.conv_1x1.bias", "ffm.channel_attention.2.conv.weight"]


def test_bisenetv1_xception39_loads_a_torchseg_checkpoint(tmp_path):
    ours = _random_state("bisenetv1_xception39")
    assert set(TORCHSEG_BISENET_X39_KEYS) <= set(ours)
    # TorchSeg's Engine.save_checkpoint: {"model", "optimizer", "epoch", "iteration"}
    _assert_loads_back(tmp_path, "bisenetv1_xception39", ours, ours, container="model")


# keys of the official SeMask Swin backbone (SeMask-FPN's semask_swin_transformer.py with the
# Swin-T ADE20K settings; SeMask-Mask2Former's is the same module), from the official module
SEMASK_SWIN_KEYS = ["backbone.patch_embed.proj.weight", "backbone.patch_embed.norm.bias",
                    "backbone.layers.0.blocks.1.attn.relative_position_bias_table",
                    "backbone.layers.0.blocks.0.attn.relative_position_index",
                    "backbone.layers.2.blocks.5.attn.qkv.weight", "backbone.layers.1.blocks.0.mlp.fc1.bias",
                    "backbone.layers.3.blocks.1.mlp.fc2.weight",
                    "backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight",
                    "backbone.layers.3.semantic_layer.class_injection.0.gamma",
                    "backbone.layers.2.downsample.reduction.weight", "backbone.layers.0.downsample.norm.bias",
                    "backbone.norm3.weight"]


def _semask_official_layout(ours: dict) -> dict:
    """segops' SeMask-Swin state under the official Swin names, patch merging's input channels
    back in the official order (the inverse of mmseg's swin2mmseg)."""
    official = {}
    for key, value in ours.items():
        if re.search(r"\.downsample\.(norm|reduction)\.", key):
            value = value[..., torch.argsort(unfold_order(value.shape[-1]))]
        key = re.sub(r"^backbone\.patch_embed\.projection\.", "backbone.patch_embed.proj.", key)
        key = re.sub(r"^backbone\.stages\.", "backbone.layers.", key)
        for ours_name, official_name in (("attn.w_msa.", "attn."), ("ffn.layers.0.0.", "mlp.fc1."),
                                         ("ffn.layers.1.", "mlp.fc2.")):
            key = key.replace(ours_name, official_name)
        official[key] = value
    return official


def test_semask_fpn_loads_an_official_checkpoint(tmp_path):
    ours = _random_state("semask-fpn_swin-t")
    official = _semask_official_layout(ours)
    assert set(SEMASK_SWIN_KEYS) <= set(official)
    _assert_loads_back(tmp_path, "semask-fpn_swin-t", official, ours)

    # patch merging with the official weights, as the official code computes it (the 2x2
    # neighbours concatenated in the order (0, 0), (1, 0), (0, 1), (1, 1))
    merging = models.build("semask-fpn_swin-t", pretrained=tmp_path / "semask-fpn_swin-t.pth")
    merging = merging.backbone.stages[0].downsample
    x = torch.randn(1, 6, 8, 96, generator=torch.Generator().manual_seed(2))
    neighbours = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    norm = [official[f"backbone.layers.0.downsample.norm.{p}"] for p in ("weight", "bias")]
    want = F.layer_norm(neighbours, (384,), *norm) @ official["backbone.layers.0.downsample.reduction.weight"].T
    with torch.no_grad():
        got, _ = merging(x.flatten(1, 2), (6, 8))
    torch.testing.assert_close(got, want.flatten(1, 2))


# keys of SeMask-Mask2Former's head (MSDeformAttnPixelFANDecoder and
# MultiScaleMaskedTransformerDecoder with the Swin-L MSFaPN config), from the official modules:
# the same names as segops'
SEMASK_MASK2FORMER_HEAD_KEYS = [
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight", "sem_seg_head.pixel_decoder.align_1.offset.weight",
    "sem_seg_head.pixel_decoder.align_1.dcpack_L2.conv_offset_mask.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias", "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.input_proj.2.1.bias", "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.predictor.query_feat.weight", "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight",
    "sem_seg_head.predictor.mask_embed.layers.2.bias"]


@pytest.mark.parametrize("name", ["semask-fpn_swin-s", "semask-fpn_swin-b", "semask-fpn_swin-l",
                                  "semask-mask2former-msfapn_swin-l"])
def test_semask_official_key_layout_of_every_variant(name):
    """The larger variants on the meta device: the official layout maps onto every key and
    shape; SeMask-Mask2Former's detectron2 checkpoints also hold the criterion's no-object
    weight, which the map drops."""
    with torch.device("meta"):
        ours = models.build(name).state_dict()
    official = _semask_official_layout(ours)
    assert set(SEMASK_SWIN_KEYS) <= set(official)
    if "mask2former" in name:
        assert set(SEMASK_MASK2FORMER_HEAD_KEYS) <= set(official)
        official["criterion.empty_weight"] = torch.empty(151, device="meta")
    renamed = official_key_map(name).apply(official)
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in ours.items()}


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
    # SFNet network/dfnet.py DFSegnet (trunk dfv1), as its train.py saves it: wrapped in
    # DataParallel, so every key starts with "module."
    "dfnet-df1": (
        dict(), [(r"^", "module.")],
        ["module.backbone.stage1.4.running_var",
         "module.backbone.stage2.0.downsample.1.num_batches_tracked",
         "module.backbone.stage5.0.downsample.0.weight", "module.cc5.bias",
         "module.ppm.stages.3.1.weight", "module.ppm.bottleneck.1.running_var",
         "module.fn3.fusion.weight", "module.fc.aux.4.bias"]),
    # DFSegnet (trunk dfv2) as the module itself names its keys
    "dfnet-df2": (
        dict(), [],
        ["backbone.stage1.4.running_mean", "backbone.stage2_2.0.downsample.1.num_batches_tracked",
         "backbone.stage3_1.9.bn2.weight", "backbone.stage4_2.0.downsample.0.weight",
         "cc3.weight", "ppm.stages.0.2.running_mean", "fn4.fusion.weight", "fc.aux.1.running_var"]),
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
