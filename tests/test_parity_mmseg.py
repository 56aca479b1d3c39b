"""Parity with mmsegmentation itself (the `parity` tier): mmseg checkpoints load into the zoo
models that have an mmseg config, and give mmseg's outputs.

For each model in `MMSEG_CONFIGS`, mmseg 1.2.2 builds its own model from the config file
(SyncBN -> BN, `tests/mmseg_reference.py`), every parameter and BatchNorm statistic is
perturbed with a seeded generator (so zero-initialised gammas and pristine BN statistics hide
nothing), the weights are saved as an mmseg checkpoint ({"state_dict", "meta"}) and loaded
strictly by `segops.models.build(name, pretrained=path)`. Then:

* full comparison (the smallest variant of every family, `Parity.full`): eval logits at an odd
  input size (33x45) against mmseg's `encode_decode(img, [{"img_shape": (H, W)}])`, on the
  reference backend and on every fused backend the model's operators have here (the compiled
  cpu kernels; Triton, under the interpreter on CPU, only where `Parity.triton` asks: CCNet,
  DNL); then in training mode (batch 2, dropout and drop-path off, the default backend: the
  cpu kernels where they exist) the main logits and every auxiliary output (auxiliary heads,
  OCRNet's FCN stage, DANet's PAM / CAM logits) against mmseg's heads' `forward` on the
  backbone features, upsampled as segops does. CCNet, NonLocal, DNL, ISANet, DANet and ANN
  have no r18 config in mmseg: their full comparison runs at the widths of mmseg's r18-d8
  configs (`at_r18_widths`); their registered widths get the eval comparison below.
* every other variant at its registered widths (`test_mmseg_checkpoint_gives_mmseg_eval_logits_
  at_registered_widths`): the eval logits at 33x45 against mmseg's `encode_decode`, on the
  reference backend only (the fused backends and the training-mode outputs run the same code
  as in the family's full comparison), the checkpoint handed over in memory: the r50-d8 and
  r101-d8 of FCN, PSPNet, DeepLabV3/V3+, of the six attention heads and of PSANet, OCRNet
  r101-d8, FCN / OCRNet on HRNet W18-Small, W18 and W48, MiT-B1..B5, ViT-S/B/L, Swin-S/B/L,
  STDC2, ICNet r50-d8: every model with an mmseg config gives mmseg's logits.

Tolerance rule (tests/utils.py, flash-attention's): mmseg's model run in fp64 is the reference;
our fp32 logits may differ from it by at most twice mmseg's own fp32 error plus a floor of
2e-5 times the largest fp64 logit (`ABS_FLOOR[torch.float32]`).

To add a model: one line in `MMSEG_CONFIGS`,
`"<segops name>": Parity("<mmseg config path relative to mmseg's configs/>"),` (add
`full=False` for a larger variant of a family already compared in full).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import segops
from segops import models
from segops._backend import REGISTRY, OpBackends

from tests.mmseg_reference import build_mmseg
from tests.utils import assert_close_to_reference, zoo_models

pytestmark = pytest.mark.parity

ODD_SIZE = (33, 45)


@dataclass(frozen=True)
class Parity:
    """How model `name` is compared with mmseg's `config` (relative to mmseg's configs/).

    full: the checkpoint round trip and the eval and training-mode comparisons; else the eval
    logits on the reference backend;
    triton: also on the Triton backend (under the interpreter on CPU: slow, so only where the
    model's fused operator is the point); mmseg_overrides / segops_kwargs: the full comparison
    at other widths than the registered ones (which then get the eval comparison),
    `at_r18_widths`.
    """

    config: str
    full: bool = True
    triton: bool = False
    size: tuple = ODD_SIZE
    mmseg_overrides: dict = field(default_factory=dict)
    segops_kwargs: dict = field(default_factory=dict)


def at_r18_widths(config: str, decode_in=512, **kw) -> Parity:
    """A D8 model with no r18 config in mmseg, compared in full at the widths of mmseg's
    r18-d8 configs (backbone depth 18, decode head `decode_in` -> 128, auxiliary 256 -> 64)."""
    overrides = dict(backbone=dict(depth=18), decode_head=dict(in_channels=decode_in, channels=128),
                     auxiliary_head=dict(in_channels=256, channels=64))
    return Parity(config, mmseg_overrides=overrides, segops_kwargs=dict(depth=18), **kw)


_CITY = "4xb2-80k_cityscapes-512x1024.py"
_ADE = "ade20k-512x512.py"
_SWIN_ADE = "upernet_8xb2-160k_ade20k-512x512.py"

# The D8 attention heads mmseg has no r18 config for: segops name -> mmseg config folder.
_ATTENTION_D8 = {"ccnet": "ccnet", "nonlocal": "nonlocal_net", "dnl": "dnlnet", "isanet": "isanet",
                 "danet": "danet", "ann": "ann"}
_SWIN = {"t": "tiny-patch4-window7-in1k-pre", "s": "small-patch4-window7-in1k-pre",
         "b": "base-patch4-window12-in22k-384x384-pre",
         "l": "large-patch4-window12-in22k-384x384-pre"}

MMSEG_CONFIGS = {
    **{f"{m}_r{d}-d8": Parity(f"{m}/{m}_r{d}-d8_{_CITY}", full=d == 18)
       for m in ("fcn", "pspnet", "deeplabv3", "deeplabv3plus") for d in (18, 50, 101)},
    **{f"{m}_r50-d8": at_r18_widths(f"{folder}/{m}_r50-d8_{_CITY}", triton=m in ("ccnet", "dnl"),
                                    decode_in=[256, 512] if m == "ann" else 512)
       for m, folder in _ATTENTION_D8.items()},
    **{f"{m}_r101-d8": Parity(f"{folder}/{m}_r101-d8_{_CITY}", full=False)
       for m, folder in _ATTENTION_D8.items()},
    # fcn_hr18s is ocrnet_hr18s's first stage, compared there in training mode
    **{f"{m}_{v}": Parity(f"{folder}/{m}_{v}_{_CITY}", full=(m, v) == ("ocrnet", "hr18s"))
       for m, folder in (("fcn", "hrnet"), ("ocrnet", "ocrnet")) for v in ("hr18s", "hr18", "hr48")},
    "ocrnet_r101-d8": Parity("ocrnet/ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024.py", full=False),
    "fpn_r50": Parity(f"sem_fpn/fpn_r50_{_CITY}"),
    **{f"segformer_mit-b{i}": Parity(f"segformer/segformer_mit-b{i}_8xb2-160k_{_ADE}",
                                     full=i == 0) for i in range(6)},
    **{f"segmenter_vit-{v}_mask": Parity(f"segmenter/segmenter_vit-{v}_mask_8xb1-160k_{_ADE}",
                                         full=v == "t") for v in "tsbl"},
    **{f"upernet_swin-{v}": Parity(f"swin/swin-{_SWIN[v]}_{_SWIN_ADE}", full=v == "t")
       for v in _SWIN},
    "psanet_r50-d8": at_r18_widths(f"psanet/psanet_r50-d8_{_CITY}"),
    "psanet_r101-d8": Parity(f"psanet/psanet_r101-d8_{_CITY}", full=False),
    "bisenetv1_r18-d32": Parity("bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py"),
    "bisenetv2_fcn": Parity("bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py"),
    "stdc1": Parity("stdc/stdc1_4xb12-80k_cityscapes-512x1024.py"),
    "stdc2": Parity("stdc/stdc2_4xb12-80k_cityscapes-512x1024.py", full=False),
    "icnet_r18-d8": Parity("icnet/icnet_r18-d8_4xb2-80k_cityscapes-832x832.py", size=(65, 97)),
    "icnet_r50-d8": Parity("icnet/icnet_r50-d8_4xb2-80k_cityscapes-832x832.py", full=False),
}

# The zoo models that follow another official repository (their key maps are in
# segops.models.checkpoints) or have no public code at all.
NO_MMSEG_CONFIG = {
    # openseg.pytorch, sssegmentation, GALD-DGCNet, TorchSeg, GateNet, the SeMask, Focal and
    # HyperSeg repositories, DF-Seg
    "ocnet_r101-d8", "ocnet-asp_r101-d8", "ocnet-pyramid_r101-d8", "stlnet_r101-d8",
    "isnet_r101-d8", "gald_r101-d8", "dgcnet_r101-d8", "dfn_r101", "gatenet_r50",
    "gatenet_vgg16", "bisenetv1_xception39", "dfnet-df1", "dfnet-df2", "hyperseg-m",
    "hyperseg-s", "hyperseg-l", "semask-fpn_swin-t", "semask-fpn_swin-s", "semask-fpn_swin-b",
    "semask-fpn_swin-l", "semask-mask2former-msfapn_swin-l", "upernet_focal-t",
    "upernet_focal-s", "upernet_focal-b",
    # no public code: from the papers
    "sdn-fcn_r50-d8", "sdn-fpn_r50", "sdn-segmenter_vit-s_mask", "acfnet_r101-d8",
    "hmanet_r101-d8", "reconet_r101-d8", "ordnet_r101-d8", "gpsnet_r101-d8",
    "deeplabv3-sd_r101-d8", "dfanet-a", "dfanet-b", "gun", "rgpnet", "lg-t",
}


def _params(keep):
    return [pytest.param(name, id=name) for name, case in MMSEG_CONFIGS.items() if keep(case)]


def test_every_model_has_an_mmseg_config_or_a_reason_not_to():
    assert set(zoo_models()) == set(MMSEG_CONFIGS) | NO_MMSEG_CONFIG


def _perturb_(model: nn.Module, seed: int) -> None:
    """Add seeded noise to every floating-point parameter and buffer: as large as the tensor's
    own spread, or 0.2 for constant tensors (BN / LN affine, biases, zero-initialised
    embeddings and gammas); BN running variances are scaled by 0.5 + U(0, 1) instead. The noise
    comes from one seeded bank of 2^20 normal samples, read from a random offset per tensor
    (drawing fresh samples for every weight of a 60M-parameter model takes seconds)."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(1 << 20, generator=gen)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            start = int(torch.randint(bank.numel(), (1,), generator=gen))
            # bank[(start + i) % len(bank)] for i < numel, as a slice of the repeated bank
            repeats = -(-(start + t.numel()) // bank.numel())
            noise = bank.repeat(repeats)[start:start + t.numel()].view(t.shape)
            if key.endswith("running_var"):
                t.mul_(0.5 + torch.special.ndtr(noise))  # ndtr: the normal CDF, U(0, 1)
                continue
            spread = t.std().item() if t.numel() > 1 else 0.0
            t.add_(noise * (spread or 0.2))


def _input(size, batch=1):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64)


def _mmseg_logits(ref, img):
    return ref.encode_decode(img, [dict(img_shape=tuple(img.shape[2:]))])


@contextlib.contextmanager
def _recording_fused_ops():
    """Yields the set of the segops operators called inside (whatever their backend)."""
    called = set()
    select = OpBackends.select

    def recording(self, *args, **kwargs):
        called.add(self.op)
        return select(self, *args, **kwargs)

    OpBackends.select = recording
    try:
        yield called
    finally:
        OpBackends.select = select


def _fused_backends(ops, with_triton):
    out = []
    for backend in ("cpu", "triton"):
        if backend == "triton" and not with_triton:
            continue
        if ops and all(REGISTRY[op].status(torch.device("cpu"), torch.float32)[backend] is None
                       for op in ops):
            out.append(backend)
    return out


def _no_dropout(model: nn.Module) -> nn.Module:
    """Training mode with dropout / drop-path off, so outputs are deterministic."""
    model.train()
    for m in model.modules():
        if "drop" in type(m).__name__.lower():
            m.eval()
    return model


def _mmseg_train_outputs(ref, img):
    """mmseg's training-mode logits at the input size: (main, [cascade stages / extra decode
    outputs..., auxiliary heads...]), as segops' EncoderDecoder orders them."""
    from mmseg.models.utils import resize
    x = ref.extract_feat(img)
    if isinstance(ref.decode_head, nn.ModuleList):
        outs = [ref.decode_head[0].forward(x)]
        for head in ref.decode_head[1:]:
            outs.append(head.forward(x, outs[-1]))
        main, extra = outs[-1], outs[:-1]
    else:
        out = ref.decode_head.forward(x)
        main, extra = (out[0], list(out[1:])) if isinstance(out, (tuple, list)) else (out, [])
    aux = getattr(ref, "auxiliary_head", None)
    heads = [] if aux is None else list(aux) if isinstance(aux, nn.ModuleList) else [aux]

    def up(out, head):  # as each head's loss resizes its logits
        return resize(out, size=img.shape[2:], mode="bilinear",
                      align_corners=getattr(head, "align_corners", ref.align_corners))
    last = ref.decode_head[-1] if isinstance(ref.decode_head, nn.ModuleList) else ref.decode_head
    first = ref.decode_head[0] if isinstance(ref.decode_head, nn.ModuleList) else ref.decode_head
    return up(main, last), [up(o, first) for o in extra] + [up(h.forward(x), h) for h in heads]


def _relative(got, ref64):
    return ((got.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1.0)).item()


def _mmseg_checkpoint(name, case: Parity, **overrides):
    """mmseg's model for `case`, perturbed, in eval mode, and its weights as an mmseg
    checkpoint (a dict: saved to a file by the full comparison)."""
    ref = build_mmseg(case.config, **overrides).eval()
    _perturb_(ref, seed=sum(map(ord, name)))
    return ref, {"state_dict": ref.state_dict(), "meta": {"config": case.config}}


def _assert_eval_logits_close(name, got: dict, want64, want32):
    for backend, logits in got.items():
        assert_close_to_reference(f"{name} eval, {backend}", logits, want64, want32, torch.float32)
        print(f"\n{name} eval {backend}: relative difference {_relative(logits, want64):.2e} "
              f"(mmseg fp32: {_relative(want32, want64):.2e})")


@pytest.mark.parametrize("name", _params(lambda case: case.full))
def test_mmseg_checkpoint_gives_mmseg_logits(name, tmp_path):
    case = MMSEG_CONFIGS[name]
    ref, checkpoint = _mmseg_checkpoint(name, case, **case.mmseg_overrides)
    path = tmp_path / f"{name}.pth"
    torch.save(checkpoint, path)
    ours = models.build(name, pretrained=path, **case.segops_kwargs).eval()
    img = _input(case.size)
    with torch.no_grad():
        want32 = _mmseg_logits(ref, img.float())
        want64 = _mmseg_logits(ref.double(), img)
        with segops.use_backend("reference"), _recording_fused_ops() as ops:
            got = {"reference": ours(img.float())}
        for backend in _fused_backends(ops, case.triton):
            with segops.use_backend(backend):
                got[backend] = ours(img.float())
    _assert_eval_logits_close(name, got, want64, want32)
    if not ours.num_aux_outputs:
        return
    # batch 2: BN on 1x1 pooled maps needs 2 values per channel (and at smaller sizes HRNet's
    # 1/32 branch normalises 2 values, which makes the comparison ill-conditioned)
    img = _input(case.size, batch=2)
    with torch.no_grad():  # (training mode updates the BN statistics: the eval runs come first)
        main64, aux64 = _mmseg_train_outputs(_no_dropout(ref), img)
        main32, aux32 = _mmseg_train_outputs(ref.float(), img.float())
        got = _no_dropout(ours)(img.float())
    if "detail" in got:  # STDC: mmseg's last auxiliary head is the 2-class detail head, whose
        # boundary channel segops returns as "detail"
        got["aux"].append(got.pop("detail"))
        aux64[-1], aux32[-1] = aux64[-1][:, 1:], aux32[-1][:, 1:]
    assert len(got["aux"]) == len(aux64), f"{name}: {len(got['aux'])} auxiliary outputs, mmseg {len(aux64)}"
    assert_close_to_reference(f"{name} train", got["out"], main64, main32, torch.float32)
    for i, (g, w64, w32) in enumerate(zip(got["aux"], aux64, aux32)):
        assert_close_to_reference(f"{name} train aux {i}", g, w64, w32, torch.float32)
        print(f"{name} train aux {i}: relative difference {_relative(g, w64):.2e} "
              f"(mmseg fp32: {_relative(w32, w64):.2e})")


def _registered_widths(case: Parity) -> bool:
    return not case.full or bool(case.segops_kwargs)


@pytest.mark.parametrize("name", _params(_registered_widths))
def test_mmseg_checkpoint_gives_mmseg_eval_logits_at_registered_widths(name):
    """The variants without a full comparison: eval logits on the reference backend (the fused
    backends and the training-mode outputs run the same code as the family's full comparison),
    the checkpoint handed over in memory. Ours runs and is freed before mmseg's model is
    converted to fp64, so memory peaks at about twice the fp32 weights (3.9 GB RSS with
    ViT-L)."""
    case = MMSEG_CONFIGS[name]
    ref, checkpoint = _mmseg_checkpoint(name, case)
    ours = models.build(name, pretrained=checkpoint).eval()
    del checkpoint
    img = _input(case.size)
    with torch.no_grad():
        with segops.use_backend("reference"):
            got = {"reference": ours(img.float())}
        del ours
        want32 = _mmseg_logits(ref, img.float())
        want64 = _mmseg_logits(ref.double(), img)
    _assert_eval_logits_close(name, got, want64, want32)
