"""Settings: every option has an environment variable (``ATELIER_*``, plus OpenAI's own names).

There is no module-level instance: the CLI entry point and ``create_app`` build one, tests build
their own. Flags override the environment; the environment overrides these defaults.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """A per-user folder: $XDG_DATA_HOME/atelier, else ~/.local/share/atelier."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "atelier"


_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")
_OFF = ("", "0", "off", "none", "never")


def parse_retention(value: object) -> object:
    """``"1h"``, ``"30m"``, ``"7d"``, ``"1h30m"``, seconds or ISO 8601 (``PT1H``) as a ``timedelta``;
    None (off) for 0, "off" and the like."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value) if value > 0 else None
    if isinstance(value, timedelta):
        return value if value > timedelta(0) else None
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in _OFF:
        return None
    if text.isascii() and text.isdigit():
        return timedelta(seconds=int(text))
    match = _DURATION.match(text)
    if match is None:
        if text.startswith("p"):  # ISO 8601 (PT1H): pydantic's own parser
            return value
        raise ValueError(f"got {value[:40]!r}; use a duration such as '1h', '30m', '7d' or '1h30m', seconds, or 'off'")
    d, h, m, s = (int(match.group(k) or 0) for k in "dhms")
    return parse_retention(timedelta(days=d, hours=h, minutes=m, seconds=s))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore", populate_by_name=True)

    # What serves requests that carry no openai_api_key. None: "openai" when OPENAI_API_KEY is set,
    # else the local default model.
    engine: Literal["local", "openai"] | None = None
    model: str = "flux2-klein-4b"  # catalog name of the local model
    model_path: Path | None = None  # a local folder saved by diffusers, instead of a catalog download
    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; None picks the best available
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None: bf16 on CUDA, fp32 on CPU
    max_batch_pixels: int | None = None  # images × pixels per pipeline call; None: per device default
    matting: str = "chroma"
    # Generation parameters (prompt, model, seed, steps, size, version) inside each output file: png text
    # chunks, EXIF in jpeg and webp (atelier.imaging.metadata). Never the key or the user_id.
    metadata: bool = True
    image_classifier: str | None = None  # "package.module:attr" — an image moderation classifier

    # Service
    host: str = "127.0.0.1"
    port: int = 5000
    data_dir: Path = Field(default_factory=default_data_dir)
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    public_url: str | None = None  # how clients reach this server, for absolute URLs; None: from request
    max_concurrency: int = 1  # jobs running at once
    max_queue: int = 64  # jobs waiting; beyond this, 429 with Retry-After
    cost_per_second: float = 0.0  # USD per second of hardware time, for cost estimates

    # Limits and fairness (atelier.jobs.limits); all off when unset. A user is a user_id within one token.
    rate_limit_per_token: str | None = None  # "60/min", "1000/day", "10/30s": predictions created per period
    rate_limit_per_user: str | None = None
    max_jobs_per_token: int | None = Field(default=None, ge=1)  # predictions queued or running at once
    max_jobs_per_user: int | None = Field(default=None, ge=1)

    @field_validator("rate_limit_per_token", "rate_limit_per_user")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        from atelier.jobs.limits import parse_rate

        if value is None or not value.strip():
            return None
        parse_rate(value)
        return value.strip()

    # Batching (atelier.jobs.queue): compatible queued jobs share one pipeline call, within max_batch_pixels
    batching: bool = True
    max_batch_jobs: int = Field(default=8, ge=1)  # jobs in one pipeline call

    # Retention
    # How long the inputs, outputs and logs of a finished prediction, and uploaded files, are kept: "1h" is
    # Replicate's policy. None (unset, "0" or "off"): kept until deleted, the default for a self-hosted server.
    retention: timedelta | None = None
    retention_interval: float = Field(default=60.0, gt=0)  # seconds between sweeps for expired data

    @field_validator("retention", mode="before")
    @classmethod
    def _parse_retention(cls, value: object) -> object:
        return parse_retention(value)

    @field_validator("retention")
    @classmethod
    def _positive_retention(cls, value: timedelta | None) -> timedelta | None:
        return value if value is not None and value > timedelta(0) else None

    # Fetching and input limits (atelier.fetch: input image URLs; atelier.api.body_limit: request bodies)
    # Hosts and networks trusted although not public: "10.0.0.0/8,images.internal,.cdn.internal".
    fetch_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fetch_allow_private: bool = False  # fetch from any non-public address (development only; never metadata)
    fetch_timeout: float = Field(default=30.0, gt=0)  # seconds for one input image URL, redirects included
    fetch_connect_timeout: float = Field(default=10.0, gt=0)
    # A request body over this is refused with 413 while it streams in. 128 MiB: a 100 MiB file upload, or
    # a 50 MiB image as a base64 data URI, fits.
    max_body_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)

    @field_validator("fetch_allow", mode="before")
    @classmethod
    def _parse_fetch_allow(cls, value: object) -> object:
        from atelier.fetch import parse_allow

        entries = value.split(",") if isinstance(value, str) else value
        if isinstance(entries, list | tuple):
            parse_allow(str(e) for e in entries)  # a ValueError naming the bad entry
            return [str(e).strip() for e in entries if str(e).strip()]
        return value

    # OpenAI upstream (OpenAI's own variable names)
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    openai_api_key_file: Path | None = None  # a file holding the operator's key (e.g. a mounted secret)
    openai_model: str = "gpt-image-2"
    openai_timeout: float = 600.0  # seconds for one HTTP attempt; high-quality renders take minutes
    openai_max_retries: int = 4  # for 429 and 5xx, with backoff honouring Retry-After
    openai_deadline: float = 900.0  # seconds for the whole call, retries included
    openai_price_text_input: float = 5.0  # USD per 1M tokens
    openai_price_image_input: float = 8.0
    openai_price_image_output: float = 30.0

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def operator_openai_key(self) -> str | None:
        """The operator's OpenAI key: ``OPENAI_API_KEY``, else the file ``ATELIER_OPENAI_API_KEY_FILE``."""
        if self.openai_api_key is not None:
            return self.openai_api_key.get_secret_value()
        if self.openai_api_key_file is not None:
            return self.openai_api_key_file.read_text().strip() or None
        return None

    @property
    def default_engine(self) -> str:
        if self.engine:
            return self.engine
        return "openai" if self.openai_api_key or self.openai_api_key_file else "local"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "atelier.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
