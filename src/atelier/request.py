"""The seed's request contract: one model that every door (Replicate, Cog, OpenAI, CLI) fills in.

Names, types, defaults and bounds are exactly those of ``openai/gpt-image-2`` on Replicate. Nothing is
clamped or coerced into something the caller did not ask for: a bad value is an ``InputError`` that
names the field, what was received and what is allowed, before any model time is spent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from atelier.errors import FieldProblem, InputError
from atelier.urls import http_url_problem

AspectRatio = Literal[
    "1:1", "3:2", "2:3", "16:9", "9:16", "auto",
    "1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "1152x2048", "3840x2160", "2160x3840",
]  # fmt: skip
Background = Literal["auto", "transparent", "opaque"]
Moderation = Literal["auto", "low"]
OutputFormat = Literal["png", "jpeg", "webp"]
Quality = Literal["low", "medium", "high", "auto"]

ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
BACKGROUNDS: tuple[str, ...] = get_args(Background)
MODERATIONS: tuple[str, ...] = get_args(Moderation)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
QUALITIES: tuple[str, ...] = get_args(Quality)

MAX_PROMPT_CHARS = 32_000
MAX_USER_ID_CHARS = 256  # an opaque id (a hash is 64 hex digits); it is stored and echoed with every prediction
MAX_KEY_CHARS = 4096  # OpenAI's keys are under 200 characters; a gateway's token (a JWT) can be a few KiB
MAX_INPUT_IMAGES = 16
MAX_IMAGES = 10
MAX_SEED = 2**32 - 1  # the range A1111, InvokeAI and Replicate's seeded models use
# Atelier's extensions to the seed's input: accepted by every door, never in the published schema.
EXTENSION_FIELDS = frozenset({"seed"})
REDACTED = "[REDACTED]"
ALPHA_FORMATS = ("png", "webp")


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's ``integer`` (what Replicate validates the seed's input against): a number with no fraction,
# ``2`` or ``2.0``; never ``true``, ``"2"`` or ``2.5``.
JsonInt = Annotated[StrictInt, BeforeValidator(_whole_number)]


class ImageRequest(BaseModel):
    """A request to create (no ``input_images``) or edit (with them) images. Field order is the seed's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="A text description of the desired image")
    openai_api_key: SecretStr | None = Field(
        default=None, description="Your OpenAI API key (optional - uses proxy if not provided)"
    )
    aspect_ratio: AspectRatio = Field(
        default="1:1",
        description="The size of the generated image. Use 'auto' to let the model pick. Sizes above 2560x1440 are "
        "experimental and may give more variable results.",
    )
    input_images: list[str] | None = Field(
        default=None, description="A list of images to use as input for the generation"
    )
    # JSON integers: true or "2" is refused, never read as 1 or 2.
    number_of_images: JsonInt = Field(default=1, ge=1, le=MAX_IMAGES, description="Number of images to generate (1-10)")
    quality: Quality = Field(default="auto", description="The quality of the generated image")
    background: Background = Field(
        default="auto",
        description="Set whether the background is transparent or opaque or choose automatically",
    )
    output_compression: JsonInt = Field(default=90, ge=0, le=100, description="Compression level (0-100%)")
    output_format: OutputFormat = Field(default="webp", description="Output format")
    moderation: Moderation = Field(default="auto", description="Content moderation level")
    user_id: str | None = Field(
        default=None,
        description="An optional unique identifier representing your end-user. This helps OpenAI monitor and "
        "detect abuse.",
    )
    # atelier: the seed of the first image (image i uses seed + i); random when absent. An engine that
    # cannot honour it (OpenAI's) refuses it rather than ignoring it. Not part of the published schema.
    seed: JsonInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description=f"Seed of the first image (image i uses seed + i), 0 to {MAX_SEED}; random if not given",
    )

    @field_validator("prompt", "user_id", "input_images", "openai_api_key")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        """compat: JSON can carry a lone surrogate ("\\ud800") or a NUL ("\\u0000"), and a form a raw NUL:
        neither is text a database can store (SQLite refuses the one, PostgreSQL the other). The doors'
        readers refuse them first; this holds for every other caller (the Python API, a form field)."""
        texts = value if isinstance(value, list) else [value]
        for i, text in enumerate(texts):
            secret = isinstance(text, SecretStr)
            where = unstorable_character(text.get_secret_value() if secret else text) if text is not None else None
            if where is not None:
                item = f"item {i} " if isinstance(value, list) else ""
                raise ValueError(f"{item}{where.message('holds', shown=not secret)}")
        return value

    @field_validator("openai_api_key")
    @classmethod
    def _key_is_visible_ascii(cls, key: SecretStr | None) -> SecretStr | None:
        """An API key goes upstream in an HTTP header, which cannot carry other characters (the call
        would fail as an engine error). Where the bad character is, never what the key is."""
        text = key.get_secret_value() if key is not None else ""
        if len(text) > MAX_KEY_CHARS:
            raise ValueError(f"is {len(text):,} characters long; an API key is at most {MAX_KEY_CHARS:,}")
        bad = next((i for i, c in enumerate(text) if not "!" <= c <= "~"), None)
        if bad is not None:
            raise ValueError(
                f"has a character that is not visible ASCII at position {bad}; an OpenAI API key is letters, "
                "digits, '-' and '_' (check for a space or a stray character when it was copied)"
            )
        return key

    @field_validator("prompt")
    @classmethod
    def _prompt_rules(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be empty; describe the image you want")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"is {len(prompt):,} characters long; the maximum is {MAX_PROMPT_CHARS:,}")
        return prompt

    @field_validator("user_id")
    @classmethod
    def _user_id_rules(cls, user_id: str | None) -> str | None:
        if user_id is not None and len(user_id) > MAX_USER_ID_CHARS:
            raise ValueError(
                f"is {len(user_id):,} characters long; the maximum is {MAX_USER_ID_CHARS} (send an opaque id, such "
                "as a hash of your user's account id)"
            )
        return user_id

    @field_validator("input_images")
    @classmethod
    def _input_image_rules(cls, images: list[str] | None) -> list[str] | None:
        if images is None:
            return None
        if len(images) > MAX_INPUT_IMAGES:
            raise ValueError(f"has {len(images)} images; at most {MAX_INPUT_IMAGES} are allowed")
        for i, ref in enumerate(images):
            if not ref.strip():
                raise ValueError(f"item {i} is empty; give an http(s) URL, a data: URI or an uploaded file URL")
            if (problem := _url_problem(ref)) is not None:
                raise ValueError(f"item {i} is not a URL that can be fetched ({problem}); got {_show(ref)}")
        return images

    @model_validator(mode="after")
    def _background_needs_alpha_format(self) -> ImageRequest:
        if self.background == "transparent" and self.output_format not in ALPHA_FORMATS:
            raise _CrossFieldError(
                "background",
                f"'transparent' cannot be encoded as '{self.output_format}' (no alpha channel); "
                "set output_format to 'png' or 'webp', or background to 'opaque' or 'auto'",
            )
        return self

    @property
    def is_edit(self) -> bool:
        return bool(self.input_images)

    def public_input(self) -> dict[str, Any]:
        """The input as it may be stored and shown: defaults filled in, the key shown as "[REDACTED]"; an
        extension the caller did not use (``seed``) is left out, so the echo stays the seed's shape."""
        unused = {name for name in EXTENSION_FIELDS if getattr(self, name) is None}
        data = self.model_dump(mode="json", exclude={"openai_api_key", *unused})
        if self.openai_api_key is not None:
            data["openai_api_key"] = REDACTED
        return data

    def api_key(self) -> str | None:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else None


UNICODE_TEXT = (
    "text must be Unicode: send it as UTF-8, or escape a character outside the Basic Multilingual Plane as a "
    "surrogate pair (\\ud83d\\ude00 for U+1F600)"
)
NUL_TEXT = "text cannot hold U+0000 (PostgreSQL cannot store it); remove the character"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Unstorable:
    """A character that text to be stored cannot hold: where it is and what it is (``\\ud800``, ``\\u0000``)."""

    at: int
    escaped: str

    def message(self, verb: str, *, shown: bool = True) -> str:
        """``holds a NUL character (\\u0000) at character 3; ...`` (``shown`` False: which one is left out)."""
        nul = self.escaped == "\\u0000"
        what = "a NUL character" if nul else "a lone surrogate"
        escaped = f" ({self.escaped})" if shown else ""
        return f"{verb} {what}{escaped} at character {self.at}; {NUL_TEXT if nul else UNICODE_TEXT}"


def unstorable_character(text: str) -> Unstorable | None:
    """The first character of ``text`` that no store can keep, or None: a UTF-16 surrogate on its own (a
    pair decodes to one character; SQLite's UTF-8 cannot hold it) or NUL (PostgreSQL's text cannot)."""
    match = _UNSTORABLE.search(text)
    return Unstorable(match.start(), f"\\u{ord(match.group()):04x}") if match else None


def _url_problem(ref: str) -> str | None:
    """Why an http(s) reference is no URL (``http://[::1/``, a port of ``99999``), or None."""
    if ref.split(":", 1)[0].lower() not in ("http", "https"):
        return None  # data: URIs and the rest are checked where they are read
    return http_url_problem(ref)


class _CrossFieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


_ALLOWED = {
    "aspect_ratio": ASPECT_RATIOS,
    "background": BACKGROUNDS,
    "moderation": MODERATIONS,
    "output_format": OUTPUT_FORMATS,
    "quality": QUALITIES,
}


def parse_request(data: Mapping[str, Any], *, prefix: str = "") -> ImageRequest:
    """Validate raw input (JSON from any door) into an ``ImageRequest`` or raise one ``InputError``.

    ``prefix`` is prepended to field names in problems (Replicate reports ``input.aspect_ratio``).
    """
    try:
        return ImageRequest.model_validate(dict(data))
    except ValidationError as exc:
        raise InputError([_problem(err, data, prefix) for err in exc.errors()]) from None


def _problem(err: Any, data: Mapping[str, Any], prefix: str) -> FieldProblem:
    loc = [str(p) for p in err["loc"]]
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _CrossFieldError):
        return FieldProblem(prefix + cause.field, cause.message, "invalid", data.get(cause.field))
    field = loc[0] if loc else "input"
    # input_images[0], as every other problem names an item (pydantic's loc would give input_images.0)
    name = prefix + (field + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if loc else "input")
    received = data.get(field) if field != "input" else None
    if len(loc) > 1 and loc[1].isdigit() and isinstance(received, list) and int(loc[1]) < len(received):
        received = received[int(loc[1])]  # the item at fault, not the whole list
    shown = _show(received) if field != "openai_api_key" else REDACTED
    kind, message = _describe(err, field, shown, ctx)
    return FieldProblem(name, message, kind, received if field != "openai_api_key" else REDACTED)


def _describe(err: Any, field: str, shown: str, ctx: dict[str, Any]) -> tuple[str, str]:
    etype = err["type"]
    if etype == "missing":
        return "required", "is required"
    if etype == "extra_forbidden":
        allowed = ", ".join(ImageRequest.model_fields)
        return "additional_property_not_allowed", f"is not an input of this model; the inputs are: {allowed}"
    if etype == "literal_error":
        return "enum", f"got {shown}; allowed values are: {', '.join(_ALLOWED[field])}"
    if etype in ("less_than_equal", "less_than"):
        return "number_lte", f"got {shown}; it must be at most {ctx.get('le', ctx.get('lt'))}"
    if etype in ("greater_than_equal", "greater_than"):
        return "number_gte", f"got {shown}; it must be at least {ctx.get('ge', ctx.get('gt'))}"
    if etype == "value_error":
        return "invalid", str(ctx.get("error", err["msg"]))
    expected = err["msg"].removeprefix("Input should be ").removesuffix(".")
    return "type", f"got {shown}; expected {expected}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
