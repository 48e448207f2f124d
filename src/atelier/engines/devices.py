"""Whether the torch installed here can use the device ``ATELIER_DEVICE`` names, checked before weights load.

``atelier.config`` checks the name's form without importing torch; this checks the device is there,
and says what to install when it is not. A CPU-only torch asked for ``cuda`` fails deep inside
``pipe.to()`` with ``AssertionError: Torch not compiled with CUDA enabled``; here it is a
``SettingsError`` naming the installed torch and how to get a CUDA build.
"""

from __future__ import annotations

from atelier.errors import FieldProblem, SettingsError

VARIABLE = "ATELIER_DEVICE"
CUDA_HELP = (
    "install a CUDA build of torch (pick yours at https://pytorch.org/get-started/locally/, e.g. "
    "`pip install torch --index-url https://download.pytorch.org/whl/cu128`; see docs/gpu.md)"
)


def check_device(name: str) -> None:
    """Raise ``SettingsError`` unless torch can place tensors on ``name`` (``cuda``, ``cuda:1``, ``mps``...)."""
    import torch

    kind, _, index = name.partition(":")
    problem = None
    if kind == "cuda":
        problem = _cuda_problem(name, int(index) if index else 0)
    elif kind == "mps" and not torch.backends.mps.is_available():
        problem = f"got 'mps', which this machine lacks (Apple silicon with macOS 12.3+ only); unset {VARIABLE}"
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        problem = f"got {name!r}, but torch {torch.__version__} sees no Intel GPU; unset {VARIABLE} to use the CPU"
    if problem is not None:
        raise SettingsError(FieldProblem(VARIABLE, problem, "device"))


def _cuda_problem(name: str, index: int) -> str | None:
    import torch as t

    version = t.__version__
    if t.version.cuda is None:
        return f"got {name!r}, but the installed torch {version} is a CPU-only build; {CUDA_HELP}, or unset {VARIABLE}"
    if not t.cuda.is_available():
        return (
            f"got {name!r}: torch {version} is built for CUDA {t.version.cuda} but finds no GPU (no NVIDIA driver, "
            f"or CUDA_VISIBLE_DEVICES hides them; `nvidia-smi` should list one); unset {VARIABLE} to use the CPU"
        )
    count = t.cuda.device_count()
    if index >= count:
        return f"got {name!r}, but torch sees {count} GPU(s): cuda:0 to cuda:{count - 1}"
    return None
