"""Settings: every option has an environment variable (``ATELIER_*``, plus OpenAI's own names).

There is no module-level instance: the CLI entry point and ``create_app`` build one, tests build
their own. Flags override the environment; the environment overrides these defaults.

A value that cannot work is refused here, when the settings are read, not when it is first used:
``load_settings`` turns pydantic's errors into one ``SettingsError`` with a problem per setting, named
as the operator wrote it (``ATELIER_MAX_CONCURRENCY``, or the flag), with what was given and what is
allowed. Only checks that need no heavy import live here (the device's presence needs torch: see
``atelier.engines.devices``).

A leaf: this module imports only errors, the value parsers (``atelier.setting_parsers``) and the data it
checks names against (the model catalog, the matting registry), none of which imports the settings
back; the modules that use settings import this one, never the other way round.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from atelier.errors import FieldProblem, SettingsError
from atelier.setting_parsers import BucketURL, parse_allow, parse_rate


def default_data_dir() -> Path:
    """A per-user folder: $XDG_DATA_HOME/atelier, else ~/.local/share/atelier."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "atelier"


_DEVICE = re.compile(r"^(?:cpu|mps|(?:cuda|xpu)(?::\d+)?)$")
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
    dtype: Literal["bfloat16", "float16", "float32"] | None = None  # None: bf16 on CUDA, fp32 on CPU
    max_batch_pixels: int | None = Field(default=None, ge=1)  # images × pixels per call; None: per device
    matting: str = "chroma"
    # Generation parameters (prompt, model, seed, steps, size, version) inside each output file: png text
    # chunks, EXIF in jpeg and webp (atelier.imaging.metadata). Never the key or the user_id.
    metadata: bool = True
    image_classifier: str | None = None  # "package.module:attr" — an image moderation classifier
    # For prompts asking for text, draw candidates and keep the one OCR reads closest to it (local models
    # only; the `ocr` extra): atelier.engines.text_check. Off by default: it multiplies render time.
    text_check: Literal["off", "best_of_n"] = "off"
    # Content Credentials: a signed C2PA manifest in every output (atelier.imaging.provenance), when both are
    # set: PEM files, the certificate chain (signer first) and its private key. Checked at start-up.
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None

    # The local engine on a GPU (atelier.engines.tuning, docs/gpu.md). Every switch is off by default: none
    # becomes a default before a GPU measurement says it should. One the device cannot honour is refused.
    offload: Literal["none", "model", "sequential", "group"] = "none"  # weights kept in RAM, moved to the GPU
    quantize: Literal["none", "torchao-int8", "bnb-8bit", "bnb-4bit"] = "none"  # transformer + text encoder
    vae_tiling: Literal["auto", "on", "off"] = "auto"  # auto: tiles above the native size, slices batches
    compile: Literal["off", "regional", "full"] = "off"  # torch.compile of the transformer, paid at start-up
    attention: str = "default"  # sdpa, sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math, or a diffusers backend
    fuse_qkv: bool = False  # one matmul for the attention's q, k and v projections
    vae_channels_last: bool = False  # the VAE's convolutions in channels-last memory format
    tf32: bool = False  # TF32 for float32 matmuls and convolutions on NVIDIA GPUs (Ampere and later)

    @field_validator("offload", "quantize", "vae_tiling", "compile", mode="before")
    @classmethod
    def _lower_choice(cls, value: object, info: ValidationInfo) -> object:
        """Any case; the usual words for off (``0``, ``false``, ``none``...) as each setting spells off."""
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        if text in (*_OFF, "false", "no"):
            return "off" if info.field_name in ("vae_tiling", "compile") else "none"
        return "on" if info.field_name == "vae_tiling" and text in ("1", "true", "yes") else text

    @field_validator("attention")
    @classmethod
    def _check_attention(cls, value: str) -> str:
        from atelier.engines.tuning import ATTENTION_NAMES

        text = value.strip().lower() or "default"
        if not re.match(r"^[a-z0-9_-]{1,40}$", text):
            raise ValueError(
                f"got {value[:40]!r}; use one of {', '.join(ATTENTION_NAMES)}, or a diffusers backend name"
            )
        return text

    # Service
    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=1, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    public_url: str | None = None  # how clients reach this server, for absolute URLs; None: from request
    max_concurrency: int = Field(default=1, ge=1)  # jobs running at once
    max_queue: int = Field(default=64, ge=0)  # jobs waiting; beyond this, 429 with Retry-After
    # The most of max_queue one token may hold waiting (and one user_id of a token, of its token's share), so
    # that another caller's first request finds room; 1 (or "off") lets one caller fill the whole queue.
    queue_share: float = Field(default=0.75, gt=0, le=1)
    cost_per_second: float = Field(default=0.0, ge=0)  # USD per second of hardware time, for cost estimates

    # Limits and fairness (atelier.jobs.limits); all off when unset. A user is a user_id within one token.
    rate_limit_per_token: str | None = None  # "60/min", "1000/day", "10/30s": predictions created per period
    rate_limit_per_user: str | None = None
    max_jobs_per_token: int | None = Field(default=None, ge=1)  # predictions queued or running at once
    max_jobs_per_user: int | None = Field(default=None, ge=1)

    # A cluster on PostgreSQL (atelier.jobs.cluster, docs/scaling.md): a worker renews its claim on a job every
    # third of lease_seconds; a job whose worker is lost runs again (same seed) up to max_attempts times.
    lease_seconds: float = Field(default=30.0, ge=1)
    max_attempts: int = Field(default=3, ge=1)

    @field_validator("queue_share", mode="before")
    @classmethod
    def _share_off(cls, value: object) -> object:
        return 1.0 if isinstance(value, str) and value.strip().lower() in ("off", "none") else value

    @field_validator("rate_limit_per_token", "rate_limit_per_user")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_rate(value)
        return value.strip()

    # Batching (atelier.jobs.queue): compatible queued jobs share one pipeline call, within max_batch_pixels
    batching: bool = True
    max_batch_jobs: int = Field(default=8, ge=1)  # jobs in one pipeline call

    # Where engine calls run (atelier.jobs.executors): "local" threads (default) or Ray Serve replicas.
    executor: Literal["local", "ray"] = "local"
    ray_address: str = "auto"  # auto (the node's running cluster) | host:port of the head's GCS
    ray_replicas: str = "1"  # replicas per model: N (fixed), or MIN-MAX scaled on the backlog (MIN 0: to zero)
    ray_num_gpus: float | None = Field(default=None, ge=0)  # per replica; None: 1 if the cluster has GPUs, else 0
    ray_num_cpus: float = Field(default=1.0, ge=0)  # per replica
    ray_max_ongoing: int = Field(default=1, ge=1)  # engine calls (each a whole batch) at once per replica

    @field_validator("ray_address")
    @classmethod
    def _check_ray_address(cls, value: str) -> str:
        return ray_address(value)

    @field_validator("ray_replicas")
    @classmethod
    def _check_replicas(cls, value: str) -> str:
        replica_range(value)
        return value.strip()

    @property
    def ray_replica_range(self) -> tuple[int, int]:
        """(min, max) replicas per model; equal for a fixed count."""
        return replica_range(self.ray_replicas)

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
    # Input images are checked from their headers at admission and decoded only when their job starts.
    max_image_pixels: int = Field(default=40_000_000, ge=1)  # width x height of one input image
    max_input_pixels: int = Field(default=100_000_000, ge=1)  # all of one request's input images together

    # Disk space in the data folder (atelier.jobs.disk): a reserve file given up when the disk fills, so the
    # work under way can still be recorded as failed; below min_free_bytes new work gets 507 Insufficient
    # Storage, until min_free_bytes + disk_reserve_bytes are free again. 0 turns either off.
    disk_reserve_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)

    # Files (atelier.jobs.files): None keeps them in the data folder; "s3://bucket/prefix" puts them in an
    # S3-compatible bucket, reached with the standard AWS_* variables (unset: obstore's own inference, e.g.
    # an instance role) and, for a store other than AWS (MinIO, R2, Ceph), ATELIER_S3_ENDPOINT_URL.
    files_url: str | None = None
    s3_endpoint_url: str | None = Field(  # AWS's own names too, as its SDKs and CLI read them
        default=None,
        validation_alias=AliasChoices(
            "ATELIER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "s3_endpoint_url"
        ),
    )
    aws_access_key_id: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key")
    )
    aws_session_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SESSION_TOKEN", "aws_session_token")
    )
    aws_region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION", "aws_region")
    )

    @field_validator("files_url")
    @classmethod
    def _check_files_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return str(BucketURL.parse(value))

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"^https?://[^/\s]+/?$", value.strip()):
            raise ValueError(
                f"got {value[:60]!r}; give the store's http:// or https:// address, e.g. http://minio:9000"
            )
        return value.strip().rstrip("/")

    # Deliveries to callers' URLs (atelier.outbound: webhooks, Cog's output_file_prefix): public addresses
    # only, unless trusted here. Separate from fetch_allow: trusting a host to receive webhooks is not
    # trusting it as a source of input images, nor the other way round.
    webhook_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_allow_private: bool = False  # deliver to any non-public address (development only; never metadata)

    @field_validator("fetch_allow", "webhook_allow", mode="before")
    @classmethod
    def _parse_fetch_allow(cls, value: object, info: ValidationInfo) -> object:
        entries = value.split(",") if isinstance(value, str) else value
        if isinstance(entries, list | tuple):
            parse_allow((str(e) for e in entries), f"ATELIER_{str(info.field_name).upper()}")  # names a bad entry
            return [str(e).strip() for e in entries if str(e).strip()]
        return value

    # The store and shared secrets (atelier.jobs.store, docs/scaling.md). database_url: a SQLAlchemy URL,
    # e.g. postgresql+psycopg://atelier@db:5432/atelier; None: the SQLite file in the data folder, which one
    # process owns. secret_key: signs file URLs in every process; None: a key kept in the store.
    database_url: SecretStr | None = None
    secret_key: SecretStr | None = None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value().strip() if value is not None else ""
        if not text:
            return None
        if not re.match(r"^(?:sqlite|postgresql)(?:\+\w+)?://", text):  # the URL may hold a password: not shown
            raise ValueError(
                "is not a database URL Atelier can use; give postgresql+psycopg://USER:PASSWORD@HOST:5432/NAME "
                "or sqlite:////absolute/path.db, or leave it unset for the SQLite file in the data folder"
            )
        return SecretStr(text)

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value().strip() if value is not None else ""
        if text and len(text) < 32:
            raise ValueError(
                "is too short to sign URLs with; give at least 32 random characters (openssl rand -hex 32)"
            )
        return SecretStr(text) if text else None

    # OpenAI upstream (OpenAI's own variable names)
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    openai_api_key_file: Path | None = None  # a file holding the operator's key (e.g. a mounted secret)
    openai_model: str = "gpt-image-2"
    openai_timeout: float = Field(default=600.0, gt=0)  # seconds for one HTTP attempt; renders take minutes
    openai_max_retries: int = Field(default=4, ge=0)  # for 429 and 5xx, with backoff honouring Retry-After
    openai_deadline: float = Field(default=900.0, gt=0)  # seconds for the whole call, retries included
    openai_price_text_input: float = Field(default=5.0, ge=0)  # USD per 1M tokens
    openai_price_image_input: float = Field(default=8.0, ge=0)
    openai_price_image_output: float = Field(default=30.0, ge=0)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            tokens = [t.strip() for t in value.split(",") if t.strip()]
            if value.strip() and not tokens:  # "," or " , ": meant as tokens, and silently none (no auth at all)
                raise ValueError(
                    "names no token (only commas and spaces); give comma-separated tokens, or leave it unset (or "
                    "empty) to serve local callers only, without tokens"
                )
            return tokens
        return value

    # -- checks that need no heavy import (see the module docstring) ------------------------------------

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not _DEVICE.match(value.strip()):
            raise ValueError(
                f"got {value[:40]!r}; use cuda, cuda:N (the Nth GPU), mps (Apple silicon), xpu or cpu, "
                "or leave it unset to pick the best available"
            )
        return value.strip()

    @field_validator("matting")
    @classmethod
    def _check_matting(cls, value: str) -> str:
        from atelier.imaging.matting import available_mattings

        if value not in available_mattings():
            raise ValueError(f"got {value[:40]!r}; available: {', '.join(available_mattings())}")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        from atelier.engines.catalog import CATALOG

        if value not in CATALOG:
            raise ValueError(f"got {value[:60]!r}; the catalog has: {', '.join(CATALOG)} (see `atelier models`)")
        return value

    @field_validator("model_path")
    @classmethod
    def _check_model_path(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            what = "is a file, not a folder" if value.exists() else "does not exist"
            raise ValueError(f"{str(value)[:200]} {what}; give a folder saved with pipeline.save_pretrained()")
        return value

    @field_validator("openai_api_key_file")
    @classmethod
    def _check_key_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            what = "is a folder, not a file" if value.exists() else "does not exist"
            raise ValueError(f"{str(value)[:200]} {what}; give a file holding the OpenAI API key")
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"{str(value)[:200]} is not readable by this user; check its owner and mode")
        return value

    @field_validator("openai_base_url", "public_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]", value):
            raise ValueError(f"got {value[:60]!r}; give an http:// or https:// URL")
        return value

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of ``field``: ``ATELIER_<FIELD>``, or OpenAI's own name."""
        info = cls.model_fields.get(field)
        if info is not None and isinstance(info.validation_alias, AliasChoices):
            first = info.validation_alias.choices[0]
            return first if isinstance(first, str) else field
        return f"ATELIER_{field.upper()}" if field in cls.model_fields else field

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
        # An operator key makes OpenAI the default only when no local model is named: naming one is a wish.
        named = self.model_path is not None or "model" in self.model_fields_set
        return "openai" if (self.openai_api_key or self.openai_api_key_file) and not named else "local"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "atelier.db"

    @property
    def database(self) -> str | Path:
        """What the store opens: ``ATELIER_DATABASE_URL``, else the SQLite file in the data folder."""
        return self.database_url.get_secret_value() if self.database_url is not None else self.database_path

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


# -- reading settings with errors an operator can act on -----------------------------------------------

SECRET_FIELDS = frozenset(
    {"openai_api_key", "api_tokens", "database_url", "secret_key", "aws_secret_access_key", "aws_session_token"}
)  # their values are never repeated back
_ALLOWED = {  # what pydantic's error types mean, said the way an operator sets a variable
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false (also 1/0, yes/no, on/off)",
    "bool_type": "expected true or false (also 1/0, yes/no, on/off)",
    "time_delta_parsing": "use a duration such as '1h', '30m', '7d' or '1h30m', seconds, or 'off'",
}


def replica_range(value: str) -> tuple[int, int]:
    """``"2"`` → (2, 2); ``"0-4"`` → (0, 4); ``ValueError`` saying what is allowed otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (-1, -1)
    if not match or high < 1 or low > high:
        raise ValueError(f"got {value[:40]!r}; give a replica count N >= 1, or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1")
    return low, high


def ray_address(value: str) -> str:
    """``value`` unless it is a Ray Client address: Ray Client carries no streaming handle calls, and every
    engine call streams its progress back (measured with Ray 2.60: ``handle.options(stream=True)`` raises)."""
    value = value.strip()
    if value.lower().startswith("ray://"):
        raise ValueError(
            f"got {value[:80]!r}; Ray Client (ray://) cannot carry the streaming calls Atelier makes to its "
            "replicas. Make this machine a node of the cluster without resources (ray start --address=HEAD:6379 "
            "--num-cpus=0 --num-gpus=0) and use auto, or give the head's GCS address as host:port"
        )
    return value


def load_settings(overrides: Mapping[str, Any] | None = None, *, names: Mapping[str, str] | None = None) -> Settings:
    """``Settings`` from the environment and ``overrides``; ``SettingsError`` with one problem per bad
    setting otherwise. ``names`` says how a field was given when not by its variable (``{"port": "--port"}``)."""
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(settings_problems(exc, names or {})) from None


def settings_problems(exc: ValidationError, names: Mapping[str, str]) -> list[FieldProblem]:
    problems: dict[str, FieldProblem] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "settings"
        name = names.get(field) or Settings.variable(field)
        if name not in problems:  # one line per setting: a union's alternatives each report the same value
            message = describe(error, secret=field in SECRET_FIELDS).removeprefix(f"{name} ")  # said once
            problems[name] = FieldProblem(name, message, error["type"])
    return list(problems.values())


def describe(error: Mapping[str, Any], *, secret: bool) -> str:
    """ "got 'two'; expected a whole number": what was given, what is allowed."""
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "value_error":  # our own validators already say both
        return str(context.get("error", error["msg"]))
    given = "the value given" if secret else f"got {shown(error.get('input'))}"
    if kind == "literal_error":
        allowed = f"allowed: {context.get('expected', '')}".replace("'", "").replace(" or ", ", ")
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bounds = {"greater_than_equal": "at least", "greater_than": "more than"}
        bounds |= {"less_than_equal": "at most", "less_than": "less than"}
        limit = next(iter(context.values()), "")
        allowed = (
            f"it must be {bounds[kind]} {limit:g}" if isinstance(limit, float) else f"it must be {bounds[kind]} {limit}"
        )
    else:
        allowed = _ALLOWED.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return f"{given}; {allowed}"


def shown(value: object) -> str:
    if not isinstance(value, str):
        return str(value)
    return repr(value[:40] + ("…" if len(value) > 40 else ""))
