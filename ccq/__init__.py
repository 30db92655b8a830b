"""ccq: trellis-coded 2/3/4-bit compression of MoE expert weights.

The public names are imported on first use, so `import ccq` (and the `ccq` command's start-up)
does not import torch or transformers. transformers learns quant_method "ccq" (for
`from_pretrained` of packed checkpoints) as soon as both ccq and transformers are imported,
in whichever order (`ccq.integration`).
"""

from .integration import register_with_transformers as _register
from .version import __version__

_PUBLIC = {
    "QuantizedTensor": "ccq.codec", "TrellisConfig": "ccq.codec", "proxy_loss": "ccq.codec",
    "quantize_tensor": "ccq.codec", "load": "ccq.format.loader", "save_quantized": "ccq.format.save",
    "quantize_model": "ccq.pipeline", "quantize_model_dir": "ccq.pipeline", "QuantSettings": "ccq.models.settings",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ccq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


_register()
