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
