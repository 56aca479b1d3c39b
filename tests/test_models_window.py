"""Model zoo part 4: window-attention transformers (SeMask-FPN, UperNet-Focal, LG).

Expected parameter counts are never taken from the code under test:
  * SeMask-FPN: counted by a scratch script that instantiated the official module definitions of
    Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/mmseg/models/backbones/
    semask_swin_transformer.py` (SeMaskSwinTransformer with the ADE20K configs
    `configs/semask_swin/ade20k/semfpn_semask_swin_{tiny,small,base,large}_*.py`: num_cls 150,
    sem_window_size = window_size, num_sem_blocks 1 per stage, drop_path 0.3) plus mmseg's
    FPNHead with the config's widths (BranchFPNHead adds no parameters). They agree with the
    SeMask paper's table (SeMask-T/S/B/L FPN: 35M / 56M / 96M / 211M). The same scratch script
    ran the official backbone against ours (its state_dict converted: mmseg's Swin names, nn.Unfold
    channel order in patch merging) in fp64 at 64x64 and 97x131, for embed dims 96 and 128 and
    150 / 19 classes: features and class maps agree to 5e-13.
  * UperNet-Focal: the official segmentation code is unreleased. Counted by a scratch script that
    instantiated microsoft/Focal-Transformer `classification/focal_transformer.py`
    FocalTransformer with `configs/focal_{tiny,small,base}_patch4_window7_224.yaml` (fc pooling,
    focal levels 2, focal windows 7/5/3/1, expand 3) built for 512x512 inputs, without its
    classifier (`norm`, `head`), plus four output LayerNorms and mmseg's UPerHead (512 channels)
    and FCNHead auxiliary (256 channels) at 150 classes. The README's ADE20K table says 62M / 85M /
    126M: 1.2M / 1.9M / 2.3M more than this count, a difference the released code does not explain
    (no option of the released class closes it for all three). The same scratch script checked
    FocalTransformerBlock against the official block (same state_dict, fp64, sizes 10x17, 9x8,
    14x21, 21x14, 14x14, focal windows 1-7): identical outputs.
  * LG-T: no code and no published figure checked (the paper's text was not available): mmseg's
    UPerNet-Swin-T (`configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-
    512x512.py`, counted live with build_mmseg) plus the closed-form size of the added paths
    described in `segops/models/backbones/lg.py`.
  * SeMask-Mask2Former-MSFaPN Swin-L: counted by a scratch script that instantiated the official
    modules of `SeMask-FAPN/SeMask-Mask2Former/mask2former/modeling/` (backbone/semask_swin.py
    SeMaskSwinTransformer, pixel_decoder/msdeformattn_fapn.py MSDeformAttnPixelFANDecoder,
    transformer_decoder/mask2former_transformer_decoder.py MultiScaleMaskedTransformerDecoder,
    DCNv2's dcn_v2.py DCN) with the config `msfapn_maskformer2_semask_swin_large_IN21k_384_bs16_
    160k_res640.yaml`, detectron2/fvcore/timm replaced by small stand-ins: 202,344,808 + 7,009,176
    + 14,497,431. The head's state_dict keys and shapes equal the official ones, and in fp32 the
    official pixel decoder and transformer decoder (its pure-PyTorch ms_deform_attn_core, DCNv2
    replaced by an explicit bilinear loop) agree with ours to 2e-7 (random weights, 2 encoder /
    4 decoder layers).
"""
from __future__ import annotations

import copy

import pytest
import torch

import segops
from segops.models import build
from segops.models.loss_terms import LossTerm
from tests.utils import assert_close_to_reference, require_backend

ODD_SIZE = (97, 131)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_build(name: str):
    with torch.device("meta"):
        return build(name)


def check_eval_odd_size(model, num_classes: int) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *ODD_SIZE))
    assert out.shape == (1, num_classes, *ODD_SIZE)
    assert torch.isfinite(out).all()


def check_train_step(model, num_classes: int, size, extra=()) -> dict:
    """Train-mode forward at batch 2 (every supervised output at the input size) and one
    backward; every backbone parameter gets a finite gradient."""
    model.train()
    res = model(torch.randn(2, 3, *size))
    assert set(res) == {"out", "aux", *extra}
    supervised = [term.select(res) for term in model.loss_terms]
    for out in supervised:
        assert out.shape == (2, num_classes, *size)
    sum(o.square().mean() for o in supervised).backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return res


# ------------------------------------------------------------------------------------- SeMask

SEMASK_PARAMS = {"t": 34_655_748, "s": 55_973_652, "b": 96_485_826, "l": 210_791_934}


@pytest.mark.parametrize("variant", sorted(SEMASK_PARAMS))
def test_semask_fpn_parameter_count(variant):
    assert n_params(meta_build(f"semask-fpn_swin-{variant}")) == SEMASK_PARAMS[variant]


def test_semask_fpn_semantic_layers_follow_the_reference_layout():
    """Official keys for the semantic layers; windowed in stages 1-2 and global in 3-4 for T, S
    and L at 150 classes, windowed everywhere for B (and at 19 classes or fewer)."""
    model = meta_build("semask-fpn_swin-t")
    keys = model.state_dict()
    prefix = "backbone.stages.3.semantic_layer."
    for name in ("norm1.weight", "class_injection.0.mlp_cls_q.weight",
                 "class_injection.0.mlp_cls_k.bias", "class_injection.0.mlp_v.weight",
                 "class_injection.0.mlp_res.weight", "class_injection.0.gamma"):
        assert prefix + name in keys
    windows = {v: [s.semantic_layer.window_size for s in meta_build(f"semask-fpn_swin-{v}")
                   .backbone.stages] for v in "tb"}
    assert windows == {"t": [7, 7, None, None], "b": [12, 12, 12, 12]}
    with torch.device("meta"):
        few = build("semask-fpn_swin-t", num_classes=19)
    assert [s.semantic_layer.window_size for s in few.backbone.stages] == [7] * 4


def test_semask_windowed_semantic_layer_is_per_window_attention():
    from segops.models.backbones.semask_swin import SemanticLayer
    torch.manual_seed(0)
    windowed = SemanticLayer(8, 5, window_size=4).double()
    for block in windowed.class_injection:
        torch.nn.init.normal_(block.gamma)
        torch.nn.init.normal_(block.mlp_res.weight)
    whole = SemanticLayer(8, 5, window_size=None).double()
    whole.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 8 * 4, 8, dtype=torch.float64)  # an 8x4 map: two 4x4 windows
    prior, out = windowed.eval()(x, (8, 4))
    for rows in (slice(0, 16), slice(16, 32)):
        p, o = whole.eval()(x[:, rows], (4, 4))
        torch.testing.assert_close(prior[:, rows], p)
        torch.testing.assert_close(out[:, rows], o)


def test_semask_fpn_forward_backward():
    model = build("semask-fpn_swin-t")
    assert model.loss_terms == [LossTerm("out"), LossTerm("semantic_prior", weight=0.4)]
    check_eval_odd_size(model, 150)
    check_train_step(model, 150, (64, 64), extra=("semantic_prior",))


def test_semask_backend_switch_equivalence():
    """semask-fpn_swin-t built with backend="cpu" (its semantic attention on the fused
    interlaced-attention kernel, fp32) against the same weights in fp64 on the reference backend,
    output and gradients of the semantic layers, under the fp64 tolerance rule. gamma and the
    residual projection start at zero, so they are randomised to make the attention count; the
    class projections get small weights (logits of a few units rather than the tens of the
    Kaiming init, whose near-one-hot softmaxes would measure conditioning, not the kernels)."""
    require_backend("interlaced_sparse_attention", "cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    model = build("semask-fpn_swin-t").eval()
    for name, p in model.named_parameters():
        if "class_injection" in name and ("gamma" in name or "mlp_res" in name):
            torch.nn.init.normal_(p, std=0.5)
        if "mlp_cls_q.weight" in name or "mlp_cls_k.weight" in name:
            torch.nn.init.normal_(p, std=0.02)
    fused = build("semask-fpn_swin-t", backend="cpu").eval()
    fused.load_state_dict(model.state_dict())
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters() if "semantic_layer" in n]

    def output_and_grads(m, img):
        out = m(img)
        params = dict(m.named_parameters())
        return out.detach(), torch.autograd.grad(out.square().mean(), [params[n] for n in names])

    img = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with segops.use_backend("reference"):
        ref64 = output_and_grads(model64, img)
        ref32 = output_and_grads(model, img.float())
    got = output_and_grads(fused, img.float())
    assert_close_to_reference("semask-fpn_swin-t", got[0], ref64[0], ref32[0], torch.float32)
    for name, g, r64, r32 in zip(names, got[1], ref64[1], ref32[1]):
        assert_close_to_reference(f"grad of {name}", g, r64, r32, torch.float32)


def test_swin_window_attention_backend_switch_equivalence(monkeypatch):
    """A small Swin (2 stages, window 4, a map needing padding, shifted blocks with the -100 mask)
    with its window attention on the fused cpu kernel (fp32), against the same weights in fp64
    on the reference backend (mmseg's plain per-window attention): the outputs and the gradients
    of every relative position bias table and qkv projection, under the tolerance rule. The bias
    tables are widened from their 0.02 init so that they matter."""
    from segops.models.backbones.swin import SwinTransformer
    from segops.ops.interlaced_sparse_attention import SPEC
    require_backend("interlaced_sparse_attention", "cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    model = SwinTransformer(embed_dims=32, depths=(2, 2), num_heads=(2, 4), strides=(4, 2),
                            window_size=4, out_indices=(0, 1), drop_path_rate=0.0).eval()
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()
             if "relative_position_bias_table" in n or "qkv" in n]
    fused_calls = []
    fused_forward = SPEC.backends.fused["cpu"].forward
    monkeypatch.setattr(SPEC.backends.fused["cpu"], "forward",
                        lambda *a: fused_calls.append(a[3] is not None) or fused_forward(*a))

    def outputs_and_grads(m, img):
        outs = m(img)
        params = dict(m.named_parameters())
        loss = sum(o.square().mean() for o in outs)
        return [o.detach() for o in outs], torch.autograd.grad(loss, [params[n] for n in names])

    img = torch.randn(1, 3, 36, 52, dtype=torch.float64)  # 9 x 13 tokens, padded to 12 x 16
    with segops.use_backend("reference"):
        ref64 = outputs_and_grads(model64, img)
        ref32 = outputs_and_grads(model, img.float())
    assert not fused_calls
    with segops.use_backend("cpu"):
        got = outputs_and_grads(model, img.float())
    assert sum(fused_calls) == 4, "every Swin block's attention runs on the fused kernel"
    for i, (g, r64, r32) in enumerate(zip(got[0], ref64[0], ref32[0])):
        assert_close_to_reference(f"stage {i}", g, r64, r32, torch.float32)
    for name, g, r64, r32 in zip(names, got[1], ref64[1], ref32[1]):
        assert_close_to_reference(f"grad of {name}", g, r64, r32, torch.float32)


def test_semask_fpn_l_uses_ohem_on_the_main_output():
    terms = meta_build("semask-fpn_swin-l").loss_terms
    assert terms[0] == LossTerm("out", "ohem_cross_entropy", kwargs={"min_kept": 100000})
    assert terms[1] == LossTerm("semantic_prior", weight=0.4)


# -------------------------------------------------------------------------------------- Focal

FOCAL_PARAMS = {"t": 60_844_352, "s": 83_105_912, "b": 123_740_844}


@pytest.mark.parametrize("variant", sorted(FOCAL_PARAMS))
def test_upernet_focal_parameter_count(variant):
    assert n_params(meta_build(f"upernet_focal-{variant}")) == FOCAL_PARAMS[variant]


@pytest.mark.parametrize("name", ["upernet_focal-t", "lg-t"])
def test_upernet_forward_backward(name):
    model = build(name)
    assert model.loss_terms == [LossTerm("out"), LossTerm("aux.0", weight=0.4)]
    check_eval_odd_size(model, 150)
    check_train_step(model, 150, (64, 64))


def test_focal_ring_and_pooled_windows_reach_outside_the_window():
    """A query window's output depends on tokens of the 3-token ring (rolled cyclically, so also
    across the map's border, as the reference) and, through the pooled windows, on tokens
    further away; with expand 0 and one focal level it is plain window attention."""
    from segops.models.backbones.focal import FocalTransformerBlock
    torch.manual_seed(0)
    x = torch.randn(1, 21 * 21, 8, dtype=torch.float64, requires_grad=True)

    def reach(block):
        out = block.double().eval()(x, (21, 21)).view(21, 21, 8)
        grad, = torch.autograd.grad(out[7:14, 7:14].sum(), x)
        return grad.view(21, 21, 8).abs().sum(-1) > 0
    full = reach(FocalTransformerBlock(8, 2, 7, expand_size=3, focal_window=3, focal_level=2))
    assert full.all()  # the centre window sees its ring and the 3x3 pooled windows around it
    local = reach(FocalTransformerBlock(8, 2, 7, expand_size=0, focal_window=3, focal_level=1))
    assert local[7:14, 7:14].all() and local.sum() == 49


# ----------------------------------------------------------------------------------------- LG

def test_lg_t_parameter_count():
    swin_upernet = 59_941_862  # mmseg upernet swin-tiny, counted with tests/mmseg_reference.py
    paths = 0
    for dims, heads, depth, n_paths in ((96, 3, 2, 2), (192, 6, 2, 2), (384, 12, 6, 2),
                                        (768, 24, 2, 1)):
        qkv_proj = dims * 3 * dims + 3 * dims + dims * dims + dims
        paths += depth * n_paths * (qkv_proj + (2 * 7 - 1) ** 2 * heads)
    assert n_params(meta_build("lg-t")) == swin_upernet + paths == 72_543_338


def test_lg_global_path_sees_the_whole_map():
    from segops.models.backbones.lg import PooledWindowPath
    torch.manual_seed(0)
    x = torch.randn(1, 30 * 20, 8, dtype=torch.float64, requires_grad=True)
    for ratio, whole in ((None, True), (2, False)):
        path = PooledWindowPath(8, 2, 7, ratio).double()
        out = path(x, (30, 20))
        assert out.shape == x.shape
        grad, = torch.autograd.grad(out[:, 0].sum(), x)
        assert bool((grad.abs().sum(-1) > 0).all()) == whole


# --------------------------------------------------------------------- SeMask Mask2Former MSFaPN

def test_semask_mask2former_parameter_count():
    model = meta_build("semask-mask2former-msfapn_swin-l")
    assert n_params(model) == 202_344_808 + 7_009_176 + 14_497_431
    assert [s.semantic_layer.window_size for s in model.backbone.stages] == [12, 12, None, None]


def test_semask_mask2former_forward_backward():
    """The architecture on SeMask-Swin-T (only Swin-L is registered: the smallest shape of the
    same model for a real run)."""
    model = build("semask-mask2former-msfapn_swin-l", variant="t", num_classes=19)
    assert model.loss_terms[1] == LossTerm("semantic_prior", weight=0.4)
    assert model.loss_terms[0].loss == "mask_classification"
    check_eval_odd_size(model, 19)
    model.train()
    res = model(torch.randn(2, 3, 64, 64))
    assert set(res) == {"out", "aux", "masks", "semantic_prior"}
    assert res["out"].shape == res["semantic_prior"].shape == (2, 19, 64, 64)
    masks = res["masks"]
    assert masks["pred_logits"].shape == (2, 100, 20)
    assert masks["pred_masks"].shape == (2, 100, 16, 16)
    assert len(masks["aux_outputs"]) == 9
    loss = res["semantic_prior"].square().mean() + sum(
        o["pred_logits"].square().mean() + o["pred_masks"].square().mean()
        for o in [masks, *masks["aux_outputs"]])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_modulated_deform_conv_with_integer_offsets_is_a_shifted_conv():
    from segops.models.heads._deformable import modulated_deform_conv2d
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    w, b = torch.randn(5, 8, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    offset = torch.zeros(2, 2 * 2 * 9, 6, 7, dtype=torch.float64)
    ones = torch.ones(2, 2 * 9, 6, 7, dtype=torch.float64)
    conv = torch.nn.functional.conv2d
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, ones, w, b, 1, 2),
                               conv(x, w, b, padding=1))
    offset[:, 0::2] = 1.0  # every tap one row down: output row y reads rows y .. y + 2
    below = torch.nn.functional.pad(x, (1, 1, 0, 2))
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, 0.5 * ones, w, b, 1, 2),
                               0.5 * conv(below, w) + b.view(1, -1, 1, 1))


def test_ms_deform_attn_samples_at_pixel_centres():
    from segops.models.heads._deformable import ms_deform_attn
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 5, dtype=torch.float64)
    # one query, one point per level, at the centre of pixel (y=1, x=2) / (y=0, x=1)
    loc = torch.tensor([[(2.5 / 4, 1.5 / 3)], [(1.5 / 2, 0.5 / 2)]], dtype=torch.float64)
    loc = loc.view(1, 1, 1, 2, 1, 2).expand(1, 1, 2, 2, 1, 2)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64).view(1, 1, 1, 2, 1)
    weights = weights.expand(1, 1, 2, 2, 1)
    out = ms_deform_attn(value, shapes, loc, weights).view(2, 5)
    expected = 0.25 * value[0, 1 * 4 + 2] + 0.75 * value[0, 12 + 0 * 2 + 1]
    torch.testing.assert_close(out, expected)
