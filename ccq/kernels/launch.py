"""The one door of every Triton launch in ccq.kernels, so a launch can be recorded instead of run.

`bench/sass.py` and the compile test run the real dispatcher (`qlinear`, `qmoe`, `dequantize`)
on meta-device tensors inside `record()`: every kernel configuration the dispatcher would
launch for a shape is captured with its exact arguments, then compiled for a GPU
architecture without a GPU (`ccq.kernels.sass`). Nothing is launched while recording.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Launch:
    """One recorded launch: the kernel, its grid and its arguments as the dispatcher passed them."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def constexprs(self) -> dict:
        """The constexpr arguments by name (the kernel configuration)."""
        names = self.kernel.arg_names
        bound = dict(zip(names, self.args)) | self.kwargs
        return {names[i]: bound[names[i]] for i in self.kernel.constexprs if names[i] in bound}


_recording: list[Launch] | None = None
_sm_count: int | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or recorded inside `record()`."""
    if _recording is not None:
        _recording.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def sm_count(device: torch.device) -> int:
    """Multiprocessors the launch heuristics size grids for (the recorded GPU's while recording)."""
    if _sm_count is not None:
        return _sm_count
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@contextmanager
def record(sm: int = 132):
    """Capture launches instead of running them, sizing grids for a GPU with `sm` multiprocessors."""
    global _recording, _sm_count
    saved = _recording, _sm_count
    _recording, _sm_count = [], sm
    try:
        yield _recording
    finally:
        _recording, _sm_count = saved


def torch_kernels(fn) -> int:
    """Kernels torch itself launches while fn runs: aten ops with a device (non-CPU) output, views excluded.

    Run on meta tensors this counts without a GPU, and it proves fn has no host sync: reading a
    meta tensor's value raises.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    views = ("view", "slice", "select", "expand", "reshape", "t.", "transpose", "unsqueeze", "squeeze", "alias",
             "detach", "as_strided", "empty", "permute", "_unsafe_view", "split", "unbind")

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs) and \
                    not any(v in str(func) for v in views):
                Count.n += 1
            return out

    with Count():
        fn()
    return Count.n
