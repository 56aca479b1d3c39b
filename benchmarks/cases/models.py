"""Whole-model benchmark cases (`python -m benchmarks.run --models`): the models whose heads run
on segops operators, at a 256x512 input (batch 1), the reference backend against every fused
backend of their operator.

Modes: `eval`, the model in eval mode, forward under torch.no_grad (inference); `train`, one
training step: train mode (auxiliary heads on), forward, the model's own training loss
(`segops.models.losses.total_loss` of its `loss_terms`) against a fixed random label map,
backward into every parameter (no optimizer update). Batch 1 leaves the image-pooling
branches' BatchNorm with one value per channel, which has no batch statistics, so the train step
keeps BatchNorm in eval mode (frozen statistics, as when fine-tuning with small batches).

`op_ms` of a row: the time of the model's segops operator calls alone, on the same backend, at
the shapes and arguments the model fed them (captured from one forward), forward for `eval`,
forward+backward for `train`; `op_fraction` = op_ms / the model's time. FLOPs: counted on the
reference provider (torch.utils.flop_counter: matrix products and convolutions).

LATENCY_MODELS, the real-time models (issue 16), get eval-mode rows only, at their usual
latency setting LATENCY_INPUT (batch 1, 512x1024), on the reference backend alone, without an
operator fraction: their time is the number of interest, not a segops operator's share of it.
"""
import torch

import segops
from benchmarks.common import Case, fused_backends
from segops.models.losses import total_loss

MODEL_OPS = {"ccnet_r50-d8": "criss_cross_attention", "dnl_r50-d8": "disentangled_non_local",
             "isanet_r50-d8": "interlaced_sparse_attention",
             "sdn-fcn_r50-d8": "semantic_difference_conv2d", "stlnet_r101-d8": "qco_1d",
             "semask-fpn_swin-t": "interlaced_sparse_attention",
             "upernet_swin-t": "interlaced_sparse_attention",
             "lg-t": "interlaced_sparse_attention",
             "ocnet-asp_r101-d8": "disentangled_non_local",
             "ocnet-pyramid_r101-d8": "interlaced_sparse_attention",
             "isnet_r101-d8": "disentangled_non_local",
             "acfnet_r101-d8": "disentangled_non_local",
             "hmanet_r101-d8": "interlaced_sparse_attention",
             "ordnet_r101-d8": "interlaced_sparse_attention"}
LATENCY_MODELS = ("bisenetv1_r18-d32", "bisenetv1_xception39", "bisenetv2_fcn", "stdc1", "stdc2",
                  "icnet_r18-d8", "icnet_r50-d8", "dfanet-a", "dfanet-b", "dfnet-df1",
                  "dfnet-df2", "hyperseg-m", "hyperseg-s", "hyperseg-l", "gun", "rgpnet")
LATENCY_INPUT = (1, 3, 512, 1024)
INPUT = (1, 3, 256, 512)
QUICK_INPUT = (1, 3, 64, 64)
MODES = ("eval", "train")


def _provider(name: str, backend: str, latency_only: bool = False):
    cache = {}

    def run(img):
        if "model" not in cache:
            from segops import models
            torch.manual_seed(0)
            cache["model"] = models.build(name, backend=backend).to(img.device, img.dtype)
        return cache["model"]
    run.backend = backend
    run.latency_only = latency_only
    return run


def _set_mode(model, train: bool) -> None:
    model.train(train)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def make_step(provider, kwargs: dict, mode: str):
    img = kwargs["img"]
    model = provider(img)
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                return model(img)
        return step
    if mode != "train":
        raise ValueError(f"model modes are {MODES}, got {mode!r}")
    _set_mode(model, True)
    classes = model.decode_head.conv_seg.out_channels
    label = torch.randint(classes, (img.shape[0],) + tuple(img.shape[2:]),
                          generator=torch.Generator().manual_seed(0)).to(img.device)

    def step():
        total_loss(model, model(img), label).backward()
        # Released within the step (not at the next one's start), so that the parameter
        # gradients count in its peak memory instead of in the level before it.
        model.zero_grad(set_to_none=True)
    return step


def _captured_calls(step) -> list:
    """(function, args, kwargs) of every segops operator call one run of `step` makes, its
    tensors detached copies that require grad where the originals did."""
    import sys
    from segops.ops._spec import SPECS
    functions = {spec.function for spec in SPECS.values()}
    calls, patched = [], []

    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.detach().clone().requires_grad_(a.requires_grad)

    def recording(fn):
        def call(*args, **kwargs):
            calls.append((fn, [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}))
            return fn(*args, **kwargs)
        return call

    for module in [m for name, m in sys.modules.items() if name.startswith("segops.") and m]:
        for attr, value in list(vars(module).items()):
            if any(value is f for f in functions) and not module.__name__.startswith("segops.ops"):
                patched.append((module, attr, value))
                setattr(module, attr, recording(value))
    try:
        step()
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
    return calls


def op_time(provider, kwargs: dict, mode: str, device: str, min_run_time: float) -> float:
    """ms the model's operator calls take alone on the provider's backend (see the docstring);
    None for the latency-only models."""
    if provider.latency_only:
        return None
    from benchmarks.measure import first_floating, time_step
    calls = _captured_calls(make_step(provider, kwargs, "eval" if mode == "eval" else "train"))
    total = 0.0
    for fn, args, kw in calls:
        leaves = [a for a in list(args) + list(kw.values())
                  if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = {}

        def step(fn=fn, args=args, kw=kw, leaves=leaves, grads=grads):
            with segops.use_backend(provider.backend):
                if mode == "eval":
                    with torch.no_grad():
                        return fn(*args, **kw)
                outs = first_floating(fn(*args, **kw))
            if not leaves:
                return outs
            if "g" not in grads:
                grads["g"] = [torch.randn_like(o) for o in outs]
            torch.autograd.grad(outs, leaves, grads["g"], allow_unused=True)
        total += time_step(step, device, min_run_time)["median_ms"]
    return total


def _image(shape):
    def make(dev, dt):
        g = torch.Generator(device="cpu").manual_seed(0)
        return dict(img=torch.randn(*shape, generator=g).to(dev, dt))
    return make


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    from segops import models
    known = set(models.list_models())
    shape = QUICK_INPUT if quick else INPUT
    out = []
    for name, op in MODEL_OPS.items():
        if name not in known:
            continue
        providers = {"reference": _provider(name, "reference")}
        providers.update({b: _provider(name, b) for b in fused_backends(op, device, dtype)})
        out.append(Case(name, "x".join(map(str, shape)), _image(shape), (), providers,
                        params=dict(input=shape, op=op), modes=MODES, step=make_step))
    shape = QUICK_INPUT if quick else LATENCY_INPUT
    for name in LATENCY_MODELS:
        if name not in known:
            continue
        out.append(Case(name, "x".join(map(str, shape)), _image(shape), (),
                        {"reference": _provider(name, "reference", latency_only=True)},
                        params=dict(input=shape), modes=("eval",), step=make_step))
    return out
