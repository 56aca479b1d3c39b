"""Public operators: `torch.library` custom ops with fakes, autograd and backend dispatch.

Every module here describes its operators with an OpSpec (segops/ops/_spec.py); importing them
all registers the custom ops, and each description's public function is exported.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from segops.ops._spec import SPECS as _SPECS

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")

globals().update({name: spec.function for name, spec in _SPECS.items()})
__all__ = sorted(_SPECS)
