"""Whole-model benchmark cases (`python -m benchmarks.run --models`): the reference backend
against the fused one, for the models whose heads run on segops operators."""
import torch

from benchmarks.common import Case

MODELS = ["ccnet_r50-d8", "isanet_r50-d8", "dnl_r50-d8", "ocrnet_hr48", "stlnet_r101-d8",
          "sdn-fcn_r50-d8"]
GPU_INPUT = (1, 3, 512, 1024)
CPU_INPUT = (1, 3, 128, 128)
QUICK_INPUT = (1, 3, 64, 64)


def _provider(name: str, backend: str):
    cache = {}

    def run(img):
        if "model" not in cache:
            from segops import models
            model = models.build(name, backend=backend).to(img.device, img.dtype)
            cache["model"] = model.eval()  # eval: no auxiliary heads, BN in inference mode
        return cache["model"](img)
    return run


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    from segops import models
    known = set(models.list_models())
    shape = QUICK_INPUT if quick else (GPU_INPUT if device == "cuda" else CPU_INPUT)
    out = []
    for name in MODELS:
        if name not in known:
            continue

        def make(dev, dt, shape=shape):
            g = torch.Generator(device="cpu").manual_seed(0)
            return dict(img=torch.randn(*shape, generator=g).to(dev, dt))
        fused = "triton" if device == "cuda" else "cpu"
        out.append(Case(name, "x".join(map(str, shape)), make, ("img",),
                        {"reference": _provider(name, "reference"), fused: _provider(name, "auto")},
                        params=dict(input=shape)))
    return out
