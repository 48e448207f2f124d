"""Settings: every option has an environment variable (``ATELIER_*``, plus OpenAI's own names).

There is no module-level instance: the CLI entry point and ``create_app`` build one, tests build
their own. Flags override the environment; the environment overrides these defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """A per-user folder: $XDG_DATA_HOME/atelier, else ~/.local/share/atelier."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "atelier"


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
