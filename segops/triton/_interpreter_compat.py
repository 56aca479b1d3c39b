"""Compatibility of Triton's CPU interpreter (TRITON_INTERPRET=1) with numpy >= 2.3.

The interpreter turns a scalar kernel argument into `int` through `int(handle.data)`, where
`data` is a 1-element 1-D array; numpy 2.3+ refuses that ("only 0-dimensional arrays can be
converted to Python scalars"), so any `range(0, runtime_bound, BLOCK)` loop fails under the
interpreter. `apply()` re-installs `__index__` with `.item()` semantics. It only touches the
interpreter's patch scope (active while an interpreted kernel runs); compiled GPU kernels are
unaffected. Idempotent.
"""
from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_segops_compat", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._segops_compat = True
    interpreter._patch_lang_tensor = patched


apply()
