"""The Python API: the same request model and engines as the server, in-process.

    from atelier import Atelier
    result = Atelier(model_path="path/to/pipeline").generate("a lighthouse at dusk", number_of_images=2)
    print(result.save("out"))

``Atelier`` validates the request exactly as every HTTP door does, loads input images (file paths are
allowed here, unlike over HTTP), checks the engine can honour the request, then runs it.

A library should not draw on its caller's terminal: the loading bars of diffusers, transformers and
huggingface_hub are off while Atelier loads and runs a model, unless ``Atelier(progress_bars=True)``
(the CLI turns them on; ``-q`` turns them off). ``Result.save`` names files as the CLI does, after the
prompt: ``a-lighthouse-at-dusk-7.png``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from atelier.config import Settings, load_settings
from atelier.engines.base import CancelToken, Engine, Job, ProgressFn, Result, no_progress
from atelier.ids import new_id, new_seed
from atelier.request import ImageRequest, parse_request

Fetch = Callable[[str], bytes]


class Atelier:
    def __init__(
        self,
        model: str | None = None,
        *,
        model_path: str | Path | None = None,
        settings: Settings | None = None,
        engine: Engine | None = None,
        progress_bars: bool = False,
    ) -> None:
        self.settings = settings or load_settings()  # a bad ATELIER_* value: SettingsError naming it
        self.progress_bars = progress_bars
        self._engine = engine
        self._model = model
        self._model_path = Path(model_path) if model_path is not None else None
        self._upstream: Engine | None = None
        self._ready: set[int] = set()
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The default engine, built on first use; its weights load in ``setup`` on the first request.

        That is the local model unless the operator chose OpenAI (``ATELIER_ENGINE=openai``, or an
        operator key with no local model named).
        """
        if self._engine is None:
            from atelier.engines.registry import create_engine

            local = self._model is not None or self._model_path is not None
            if self.settings.default_engine == "openai" and not local:
                self._engine = create_engine("openai", self.settings)
            else:
                self._engine = create_engine("diffusers", self.settings, model=self._model, model_path=self._model_path)
        return self._engine

    def engine_for(self, request: ImageRequest) -> Engine:
        """A request carrying its own ``openai_api_key`` always goes to OpenAI."""
        if request.openai_api_key is None or self.engine.name == "openai":
            return self.engine
        if self._upstream is None:
            from atelier.engines.registry import create_engine

            self._upstream = create_engine("openai", self.settings)
        return self._upstream

    def close(self) -> None:
        """Release the engines' connections (the OpenAI engine's pool); ``Atelier`` works again after."""
        from atelier.jobs.routing import close_engines

        close_engines(e for e in (self._engine, self._upstream) if e is not None)

    def __enter__(self) -> Atelier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self, engine: Engine | None = None) -> Engine:
        engine = engine or self.engine
        with self._lock:
            if id(engine) not in self._ready:
                engine.setup()
                self._ready.add(id(engine))
        return engine

    def generate(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
        mask: str | Path | None = None,
        **inputs: Any,
    ) -> Result:
        """Create images; ``inputs`` are the seed's fields (``aspect_ratio``, ``number_of_images``...). With a
        ``mask``, ``aspect_ratio`` defaults to ``auto``: a masked edit keeps the image's shape."""
        if mask is not None:
            inputs.setdefault("aspect_ratio", "auto")
        request = parse_request({"prompt": prompt, **inputs})
        return self.run(request, seed=seed, progress=progress, cancel=cancel, allow_paths=True, mask=mask)

    def edit(self, prompt: str, images: Sequence[str | Path], **kwargs: Any) -> Result:
        """Edit or compose ``images`` (file paths, URLs or data: URIs) as the prompt says. ``mask=`` (the
        same forms) is OpenAI's: an image the first one's size whose transparent pixels are what changes."""
        return self.generate(prompt, input_images=[str(i) for i in images], **kwargs)

    def prepare(
        self,
        request: ImageRequest,
        *,
        seed: int | None = None,
        allow_paths: bool = False,
        previews: int = 0,
        mask: str | Path | None = None,
    ) -> Job:
        """Load and check everything a job needs; raises before any model time is spent."""
        from atelier.fetch import FetchPolicy
        from atelier.imaging.inputs import fetch_url, load_references
        from atelier.imaging.masks import load_mask

        if seed is not None:  # in the request, so an engine that cannot honour a seed refuses it
            request = request.model_copy(update={"seed": seed})
        fetch = partial(fetch_url, policy=FetchPolicy.from_settings(self.settings))
        images = load_references(request.input_images or [], allow_paths=allow_paths, fetch=fetch)
        job = Job(
            id=new_id(),
            request=request,
            seed=chosen_seed(seed, request.seed),
            images=tuple(images),
            previews=previews,
            mask=None if mask is None else load_mask(str(mask), allow_paths=allow_paths, fetch=fetch),
        )
        self.engine_for(request).check(job)
        return job

    def run(
        self,
        request: ImageRequest,
        *,
        seed: int | None = None,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
        allow_paths: bool = False,
        mask: str | Path | None = None,
    ) -> Result:
        job = self.prepare(request, seed=seed, allow_paths=allow_paths, mask=mask)
        with loading_bars(self.progress_bars):
            engine = self.setup(self.engine_for(request))
            result = engine.generate(job, progress=progress, cancel=cancel or CancelToken())
        if self.settings.metadata:  # the parameters in the files, as the server writes them
            from atelier.imaging.metadata import annotate

            result = annotate(result, job)
        return replace(result, stem=slug(request.prompt))


def chosen_seed(given: int | None, requested: int | None) -> int:
    """The argument's seed, else the request's, else a random one (-1 means random, as in other tools)."""
    seed = given if given is not None and given != -1 else requested
    return new_seed() if seed is None or seed == -1 else seed


def slug(prompt: str, limit: int = 40) -> str:
    """A file name stem from a prompt: "A lighthouse at dusk!" is ``a-lighthouse-at-dusk``."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


@contextmanager
def loading_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's progress bars (which diffusers' and transformers' loading bars follow) off unless
    ``show``; restored after, so a caller's own settings stand."""
    if show:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
