"""segops: fused kernels for semantic segmentation operators, and reference models.

Operators (docs/operators.md §2) are available as `segops.<name>`; layers in `segops.nn`; models in
`segops.models`. Importing segops loads no kernels and queries no device.
"""
from segops._backend import BACKENDS, use_backend
from segops.ops import *  # noqa: F401,F403
from segops.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["BACKENDS", "use_backend", *_ops_all]
