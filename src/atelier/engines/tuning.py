"""How a pipeline uses the device: memory options (offload, quantization, VAE tiling) and speed switches.

Every option is off by default and set by one ``ATELIER_*`` variable (docs/gpu.md). ``Tuning`` holds them;
``problems(device)`` says which the device cannot honour (offloading on a CPU-only machine, bitsandbytes
without CUDA, a flash kernel on a CPU), so the engine refuses them before any weight is read, as one
``SettingsError`` line each, instead of a traceback from deep inside diffusers. The rest applies them to a
loaded pipeline and says what it did (``Applied``), so tests and logs can tell a switch that took effect
from one that was accepted and ignored.

torch and diffusers are imported inside the functions: ``atelier.config`` imports this module's names.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from atelier.errors import FieldProblem, SettingsError

if TYPE_CHECKING:
    from atelier.config import Settings

# Our names for torch's own SDPA kernels (diffusers' dispatcher names in the values); any other diffusers
# attention backend (``flash``, ``flash_hub``, ``_flash_3``, ``sage``, ``xformers``...) is taken as it is.
ATTENTION_NAMES = {
    "default": None,  # whatever the model's processors do: torch SDPA choosing its kernel per call
    "sdpa": "native",
    "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient",
    "sdpa-cudnn": "_native_cudnn",
    "sdpa-math": "_native_math",
}
CPU_ATTENTION = frozenset({"native", "_native_math"})  # what runs without a GPU
# The components quantized: the transformer (diffusers) and the text encoder (transformers). The VAE is
# small and quality-sensitive, so it stays in the pipeline's dtype.
QUANTIZED = ("transformer", "text_encoder")
# Weight bytes per parameter (computed table in docs/gpu.md; bench/gpu.py measures the real figure).
BYTES_PER_PARAMETER = {"none": 2.0, "torchao-int8": 1.0, "bnb-8bit": 1.0, "bnb-4bit": 0.5}


@dataclass(frozen=True)
class Tuning:
    """The memory and speed options of one process (``Settings`` fields of the same names)."""

    offload: str = "none"  # none | model | sequential | group
    quantize: str = "none"  # none | torchao-int8 | bnb-8bit | bnb-4bit
    vae_tiling: str = "auto"  # auto | on | off
    compile: str = "off"  # off | regional | full
    attention: str = "default"
    fuse_qkv: bool = False
    vae_channels_last: bool = False
    tf32: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Tuning:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @property
    def changed(self) -> dict[str, Any]:
        """The options set away from their defaults."""
        default = Tuning()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        }

    def backend(self) -> str | None:
        """diffusers' name of the attention backend asked for; None: leave the processors alone."""
        return ATTENTION_NAMES.get(self.attention, self.attention)

    # -- what the device can honour ---------------------------------------------------------------------

    def problems(self, device: str) -> list[FieldProblem]:
        """One problem per option ``device`` cannot honour, named by its variable; [] when all can."""
        kind = device.partition(":")[0]
        found = [
            _fuse_problem(self.fuse_qkv, self.quantize),
            _offload_problem(self.offload, kind),
            _quantize_problem(self.quantize, kind),
            _compile_problem(self.compile, kind),
            _attention_problem(self.attention, self.backend(), kind),
            _tf32_problem(self.tf32, kind),
        ]
        return [problem for problem in found if problem is not None]

    def check(self, device: str) -> None:
        """``SettingsError`` listing what ``device`` cannot honour (imports torch only when an option is set)."""
        if not self.changed:
            return
        problems = self.problems(device)
        if problems:
            raise SettingsError(problems)

    # -- loading ------------------------------------------------------------------------------------------

    def quantization(self, components: tuple[str, ...], dtype: Any) -> Any:
        """A diffusers ``PipelineQuantizationConfig`` for ``from_pretrained``; None when not quantizing.

        One config per library (diffusers for the transformer, transformers for the text encoder), since
        diffusers' shorthand refuses backends whose two config classes take different arguments (torchao).
        """
        if self.quantize == "none":
            return None
        from diffusers.quantizers import PipelineQuantizationConfig

        mapping = {name: _quant_config(self.quantize, name, dtype) for name in QUANTIZED if name in components}
        return PipelineQuantizationConfig(quant_mapping=mapping)

    def place(self, pipe: Any, device: str) -> str:
        """Put ``pipe`` on ``device``, or set up its offloading there; returns how."""
        import torch

        if self.offload == "none":
            pipe.to(device)
            return f"on {device}"
        if self.offload == "model":  # one whole component on the GPU at a time
            pipe.enable_model_cpu_offload(device=device)
        elif self.offload == "sequential":  # one layer at a time: least memory, slowest
            pipe.enable_sequential_cpu_offload(device=device)
        else:  # leaf-level groups, prefetched on a side CUDA stream while the previous group computes
            stream = device.startswith("cuda")
            pipe.enable_group_offload(
                onload_device=torch.device(device),
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=stream,
                record_stream=stream,
            )
        return f"offloaded ({self.offload}) to {device}"

    def apply(self, pipe: Any, device: str) -> Applied:
        """Apply every option but quantization (``quantization``, at load) to a loaded pipeline.

        The switches go first, while the modules are plain (offloading wraps them in hooks), compilation
        last. A library refusing an option is a ``SettingsError`` naming its variable.
        """
        import torch

        applied = Applied()
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            applied.switches.append("tf32")
        if self.fuse_qkv:
            with refusal("ATELIER_FUSE_QKV", pipe):
                fuse_qkv(pipe)
            applied.switches.append("fuse_qkv")
        if self.vae_channels_last:
            with refusal("ATELIER_VAE_CHANNELS_LAST", pipe):
                pipe.vae.to(memory_format=torch.channels_last)
            applied.switches.append("vae_channels_last")
        backend = self.backend()
        if backend is not None:
            with refusal("ATELIER_ATTENTION", pipe):
                pipe.transformer.set_attention_backend(backend)
            applied.switches.append(f"attention={backend}")
        with refusal("ATELIER_OFFLOAD" if self.offload != "none" else "ATELIER_DEVICE", pipe, device=device):
            applied.placement = self.place(pipe, device)
        with refusal("ATELIER_COMPILE", pipe):
            self.compile_transformer(pipe)
        if self.compile != "off":
            applied.switches.append(f"compile={self.compile}")
        applied.quantized = self.quantize
        return applied

    def compile_transformer(self, pipe: Any) -> None:
        """Wrap the transformer (or its repeated blocks) in ``torch.compile``; the cost is paid on the first
        call, which the engine makes at start-up (``DiffusersEngine.setup``)."""
        transformer = pipe.transformer
        if self.compile == "regional":
            if not getattr(transformer, "_repeated_blocks", None):
                raise SettingsError(
                    FieldProblem(
                        "ATELIER_COMPILE",
                        f"{type(transformer).__name__} names no repeated blocks to compile one by one; "
                        "use ATELIER_COMPILE=full",
                    )
                )
            transformer.compile_repeated_blocks(fullgraph=True)
        elif self.compile == "full":
            transformer.compile(fullgraph=True)

    @contextlib.contextmanager
    def vae_mode(self, pipe: Any, *, pixels: int, images: int, native_pixels: int) -> Iterator[str]:
        """VAE tiling and slicing for one call: ``on`` always, ``off`` never, ``auto`` tiles a render above
        the model's native size and slices a batch (one image through the VAE at a time). Yields what it set."""
        vae = pipe.vae
        tile = self.vae_tiling == "on" or (self.vae_tiling == "auto" and pixels > native_pixels)
        slice_ = self.vae_tiling == "on" or (self.vae_tiling == "auto" and images > 1)
        tile = tile and hasattr(vae, "enable_tiling")
        slice_ = slice_ and hasattr(vae, "enable_slicing")
        if tile:
            vae.enable_tiling()
        if slice_:
            vae.enable_slicing()
        try:
            yield "+".join(name for name, on in (("tiled", tile), ("sliced", slice_)) if on) or "whole"
        finally:
            if tile:
                vae.disable_tiling()
            if slice_:
                vae.disable_slicing()


@dataclass
class Applied:
    """What ``Tuning`` did to a pipeline, for the start-up log and the warm-start report."""

    placement: str = ""
    quantized: str = "none"
    switches: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    compile_seconds: float | None = None  # the first call's extra cost with ATELIER_COMPILE set

    def describe(self) -> str:
        parts = [self.placement]
        if self.quantized != "none":
            parts.append(f"quantized {self.quantized}")
        parts += self.switches
        return ", ".join(p for p in parts if p)


OUT_OF_MEMORY = (
    "the weights do not fit in the memory of {device}; set ATELIER_OFFLOAD=model (or group), or "
    "ATELIER_QUANTIZE=bnb-4bit, torchao-int8 or bnb-8bit (docs/gpu.md has the memory each needs)"
)


@contextlib.contextmanager
def refusal(variable: str, pipe: Any, *, device: str = "") -> Iterator[None]:
    """A library's refusal of an option, as a ``SettingsError`` naming its variable (one line, no traceback)."""
    try:
        yield
    except SettingsError:
        raise
    except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError, AttributeError) as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError moving the weights
            raise SettingsError(FieldProblem(variable, OUT_OF_MEMORY.format(device=device or "the GPU"))) from exc
        text = str(exc).strip()
        message = text.splitlines()[0][:300] if text else type(exc).__name__
        raise SettingsError(FieldProblem(variable, f"{type(pipe).__name__} refused it: {message}")) from exc


def fuse_qkv(pipe: Any) -> None:
    """One projection for q, k and v in the transformer (and in the VAE's attention, where it has one)."""
    transformer = pipe.transformer
    if not hasattr(transformer, "fuse_qkv_projections"):
        raise SettingsError(
            FieldProblem(
                "ATELIER_FUSE_QKV",
                f"{type(transformer).__name__} cannot fuse its attention projections in this diffusers; unset it",
            )
        )
    transformer.fuse_qkv_projections()
    if hasattr(pipe.vae, "fuse_qkv_projections"):
        pipe.vae.fuse_qkv_projections()


def check_settings(settings: Settings) -> None:
    """Refuse, before a server starts, the options the local default model's device cannot honour.

    Nothing is imported unless an option is set, so a default ``atelier serve`` starts as before.
    """
    tuning = Tuning.from_settings(settings)
    if not tuning.changed or settings.default_engine != "local":
        return
    from atelier.engines.diffusers import pick_device

    tuning.check(settings.device or pick_device())


# -- what each option needs ----------------------------------------------------------------------------------


def _fuse_problem(fuse: bool, quantize: str) -> FieldProblem | None:
    if not fuse or quantize == "none":
        return None
    return FieldProblem(
        "ATELIER_FUSE_QKV",
        f"cannot fuse quantized projections (ATELIER_QUANTIZE={quantize}); unset one of the two",
        "conflict",
    )


def _offload_problem(offload: str, kind: str) -> FieldProblem | None:
    if offload == "none" or kind in ("cuda", "xpu") or (kind == "mps" and offload != "group"):
        return None
    if kind == "mps":
        return FieldProblem("ATELIER_OFFLOAD", "got 'group', which needs CUDA or XPU streams; use model or sequential")
    return FieldProblem(
        "ATELIER_OFFLOAD",
        f"got {offload!r}, but the device is the CPU: offloading keeps weights in RAM and moves them to a GPU "
        "for each use, and there is no GPU; unset ATELIER_OFFLOAD (or set ATELIER_DEVICE=cuda on a GPU machine)",
    )


def _quantize_problem(quantize: str, kind: str) -> FieldProblem | None:
    if quantize == "none":
        return None
    package = "torchao" if quantize.startswith("torchao") else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        return FieldProblem(
            "ATELIER_QUANTIZE", f"got {quantize!r}, which needs the {package} package: pip install {package}"
        )
    if package == "bitsandbytes" and kind != "cuda":
        return FieldProblem(
            "ATELIER_QUANTIZE",
            f"got {quantize!r}, but bitsandbytes quantizes on CUDA GPUs only and the device is {kind}; "
            "use ATELIER_QUANTIZE=torchao-int8 (runs on a CPU too), or none",
        )
    return None


def _compile_problem(compile: str, kind: str) -> FieldProblem | None:
    if compile == "off":
        return None
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return FieldProblem(
            "ATELIER_COMPILE", f"got {compile!r}, which needs triton for CUDA kernels: pip install triton"
        )
    if kind == "cpu" and not _cpp_compiler():
        return FieldProblem(
            "ATELIER_COMPILE",
            f"got {compile!r}, which needs a C++ compiler on a CPU (g++ or clang++, or CXX set); install one or "
            "unset ATELIER_COMPILE",
        )
    return None


def _cpp_compiler() -> str | None:
    named = os.environ.get("CXX")
    return shutil.which(named) if named else shutil.which("g++") or shutil.which("clang++")


def _attention_problem(name: str, backend: str | None, kind: str) -> FieldProblem | None:
    if backend is None:
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    known = [b.value for b in AttentionBackendName]
    if backend not in known:
        ours = ", ".join(ATTENTION_NAMES)
        return FieldProblem(
            "ATELIER_ATTENTION", f"got {name!r}; use one of {ours}, or a diffusers backend: {', '.join(known)}"
        )
    if kind != "cuda" and backend not in CPU_ATTENTION:
        return FieldProblem(
            "ATELIER_ATTENTION",
            f"got {name!r}, a GPU kernel, but the device is {kind}; use sdpa or sdpa-math there, or unset it",
        )
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError, ValueError) as exc:
        return FieldProblem("ATELIER_ATTENTION", f"got {name!r}, which this install cannot run: {exc}")
    return None


def _tf32_problem(tf32: bool, kind: str) -> FieldProblem | None:
    if not tf32 or kind == "cuda":
        return None
    return FieldProblem(
        "ATELIER_TF32", f"TF32 is a mode of NVIDIA GPUs (Ampere and later), and the device is {kind}; unset it"
    )


def _quant_config(quantize: str, component: str, dtype: Any) -> Any:
    """The quantization config of one component, from its own library (diffusers or transformers)."""
    if component == "transformer":
        import diffusers as library
    else:
        import transformers as library  # type: ignore[no-redef]
    if quantize == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return library.TorchAoConfig(Int8WeightOnlyConfig())
    if quantize == "bnb-8bit":
        return library.BitsAndBytesConfig(load_in_8bit=True)
    return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
