"""Model zoo part 3 (issue 17): context heads with segops operators inside, and the layers they
brought (`segops.nn.PSAMask`, ...).

Expected parameter counts never come from the code under test:
- psanet_r{50,101}-d8: mmseg 1.2.2 `configs/psanet/psanet_r{50,101}-d8_4xb2-40k_cityscapes-
  512x1024.py` built live (tests/mmseg_reference.py, meta device) and counted: 59,138,694 and
  78,130,822; the test also compares the state_dict keys and shapes with mmseg's live.
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
}

# config name -> mmseg config (relative to mmseg's bundled configs) for the key comparison.
MMSEG_CONFIGS = {
    "psanet_r50-d8": "psanet/psanet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
    "psanet_r101-d8": "psanet/psanet_r101-d8_4xb2-40k_cityscapes-512x1024.py",
}

# segops operators each model runs (for the backend-switch test); models not listed run none.
MODEL_OPS: dict[str, tuple] = {}

# Forward/backward configurations: the smallest variant of each model (`depth` overrides).
SMALL = {
    "psanet_r50-d8": dict(depth=18),
}
N_AUX: dict[str, int] = {}
EXTRA_OUTPUTS: dict[str, tuple] = {}


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


def _loss(res, model):
    loss = 0.0
    for term in model.loss_terms:
        out = term.select(res)
        loss = loss + term.weight * out.float().square().mean()
    return loss


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_odd_size_and_train_step(name):
    model = models.build(name, **SMALL[name])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 97, 131))
    classes = model.decode_head.conv_seg.out_channels
    assert out.shape == (1, classes, 97, 131) and torch.isfinite(out).all()

    model.train()
    res = model(torch.randn(2, 3, 128, 128))
    assert res["out"].shape == (2, classes, 128, 128)
    assert len(res["aux"]) == N_AUX.get(name, 1)
    for key in EXTRA_OUTPUTS.get(name, ()):
        assert res[key].shape[-2:] == (128, 128)
    outputs = {t.output for t in model.loss_terms}
    assert outputs == {"out", *(f"aux.{i}" for i in range(len(res["aux"]))),
                       *EXTRA_OUTPUTS.get(name, ())}
    _loss(res, model).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(n for n in SMALL if n in MODEL_OPS))
def test_backend_reference_vs_fused_cpu(name):
    """backend="cpu" (fused kernels, fp32) against the same weights in fp64 on the reference
    backend, under the tolerance rule of tests/utils.py."""
    for op in MODEL_OPS[name]:
        require_backend(op, "cpu", "cpu", torch.float32)
    assert_fused_model_close(models.build, name, size=(65, 65), **SMALL[name])
