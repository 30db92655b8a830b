"""Register ccq's quantizer with transformers without importing transformers eagerly.

If transformers is already imported, the registration happens now; otherwise a one-shot import
hook registers it right after `import transformers` completes. Either way
`from_pretrained(packed_dir)` finds quant_method "ccq" while `ccq --help` stays light.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register():
    from .format.hf_quantizer import register

    register()


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level `transformers` module to register ccq once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def register_with_transformers() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
