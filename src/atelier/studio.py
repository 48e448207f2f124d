"""The Python API: the same request model and engines as the server, in-process.

    from atelier import Atelier
    result = Atelier(model_path="path/to/pipeline").generate("a lighthouse at dusk", number_of_images=2)
    print(result.save("out"))

``Atelier`` validates the request exactly as every HTTP door does, routes it as the server does
(``atelier.jobs.routing``: a request carrying its own ``openai_api_key`` goes to OpenAI), loads input
images with the server's limits (``ATELIER_MAX_IMAGE_PIXELS``, ``ATELIER_MAX_INPUT_PIXELS``; file paths
are allowed here, unlike over HTTP), has the engine check the request once, then runs it on that plan.

A library should not draw on its caller's terminal: the loading bars of diffusers, transformers and
huggingface_hub are off while Atelier loads and runs a model, unless ``Atelier(progress_bars=True)``
(the CLI turns them on; ``-q`` turns them off). ``Result.save`` names files as the CLI does, after the
prompt: ``a-lighthouse-at-dusk-7.png``.
"""

from __future__ import annotations

import importlib.util
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
from atelier.imaging import provenance
from atelier.jobs.routing import EngineRouter
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
        self._router: EngineRouter | None = None
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

    @property
    def router(self) -> EngineRouter:
        """The server's routing over this object's engines: the default one, and OpenAI's (when the
        ``openai`` package is installed) for requests that carry their own ``openai_api_key``."""
        if self._router is None:
            default = self.engine
            engines = {default.model: default}
            if default.name != "openai" and importlib.util.find_spec("openai") is not None:
                from atelier.engines.registry import create_engine

                engines.setdefault("openai", create_engine("openai", self.settings))
            self._router = EngineRouter(engines, default.model)
        return self._router

    def engine_for(self, request: ImageRequest) -> Engine:
        """As the server routes it: a request carrying its own ``openai_api_key`` always goes to OpenAI."""
        return self.router.engine_for(request)

    def close(self) -> None:
        """Release the engines' connections (the OpenAI engine's pool); ``Atelier`` works again after."""
        if self._router is not None:
            self._router.close()
        elif self._engine is not None:
            from atelier.jobs.routing import close_engines

            close_engines([self._engine])

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
        from atelier.jobs.inputs import InputLimits, check_total

        if seed is not None:  # in the request, so an engine that cannot honour a seed refuses it
            request = request.model_copy(update={"seed": seed})
        engine = self.engine_for(request)  # routed first: a request the server would refuse costs no download
        fetch = partial(fetch_url, policy=FetchPolicy.from_settings(self.settings))
        limits = InputLimits.from_settings(self.settings)  # the server's limits, for one image and all together
        images = load_references(
            request.input_images or [], allow_paths=allow_paths, fetch=fetch,
            max_pixels=limits.image_pixels, max_bytes=limits.max_bytes,
        )  # fmt: skip
        check_total([image.size for image in images], limits)
        job = Job(
            id=new_id(),
            request=request,
            seed=chosen_seed(seed, request.seed),
            images=tuple(images),
            previews=previews,
            mask=None if mask is None else load_mask(str(mask), allow_paths=allow_paths, fetch=fetch),
        )
        return replace(job, plan=engine.check(job))  # checked once: generate runs on this plan

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
        provenance.check(self.settings)  # a bad signing certificate: refused before any model time
        job = self.prepare(request, seed=seed, allow_paths=allow_paths, mask=mask)
        with loading_bars(self.progress_bars):
            engine = self.setup(self.engine_for(request))
            result = engine.generate(job, progress=progress, cancel=cancel or CancelToken())
        if self.settings.metadata:  # the parameters in the files, as the server writes them
            from atelier.imaging.metadata import annotate

            result = annotate(result, job)
        result = provenance.stamp(result, job, self.settings)  # last: the manifest hashes the file as saved
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
