"""``atelier generate`` and ``atelier edit``: one request, images written to a folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from atelier.cli.problems import Problems, image_namer, problem_lines
from atelier.cli.settings import MODEL_OPTIONS, choose_model, settings_for
from atelier.engines.base import ProgressEvent
from atelier.errors import FieldProblem, InputError
from atelier.request import parse_request

if TYPE_CHECKING:
    from atelier.config import Settings

MAX_SEED = 2**32 - 1

FIELD_OPTIONS = (
    "aspect_ratio", "background", "moderation", "number_of_images", "output_compression",
    "output_format", "quality", "user_id", "openai_api_key",
)  # fmt: skip


def request_options(func: Any) -> Any:
    """The contract's fields as options; values are validated by the request model, not by click."""
    options = [
        click.option("--aspect-ratio", help="1:1 3:2 2:3 16:9 9:16 auto, or a size like 1536x1024. [1:1]"),
        click.option("--background", help="auto, transparent or opaque. [auto]"),
        click.option("--moderation", help="auto or low. [auto]"),
        click.option("-n", "--number-of-images", type=int, help="How many images, 1-10. [1]"),
        click.option("--output-compression", type=int, help="0-100; quality for jpeg/webp, effort for png. [90]"),
        click.option("--output-format", help="png, jpeg or webp. [webp]"),
        click.option("--quality", help="low, medium, high or auto. [auto]"),
        click.option("--user-id", help="Your end-user's id, recorded with the request."),
        click.option(
            "--openai-api-key",
            help="Send this request to OpenAI's Images API with this key; never stored or logged. A key on the "
            "command line is visible to other local users (ps, /proc): prefer --openai-api-key-file or "
            "OPENAI_API_KEY.",
        ),
        click.option(
            "--openai-api-key-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
            help="Like --openai-api-key, with the key read from this file ('-' reads it from stdin), so it "
            "never appears in the process list.",
        ),
        *MODEL_OPTIONS,
        click.option(
            "--seed", type=click.IntRange(-1, MAX_SEED),
            help="Seed of the first image (image i uses seed+i); random if unset or -1.",
        ),
        click.option(
            "-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
            help="Folder to write images into.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
        click.option(
            "--mask",
            help="A PNG the size of the first image whose transparent pixels are the area to edit "
            "(inpainting); --aspect-ratio then defaults to auto.",
        ),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@click.argument("prompt")
@click.option("--image", "images", multiple=True, help="An input image (path, URL or data: URI); makes it an edit.")
@request_options
@click.pass_context
def generate(ctx: click.Context, prompt: str, images: tuple[str, ...], **options: Any) -> None:
    """Create images from PROMPT (or edit --image inputs) and print the paths written."""
    run(ctx, prompt, list(images), options, image_option="--image")


@click.command()
@click.argument("prompt")
@click.argument("images", nargs=-1, required=True)
@request_options
@click.pass_context
def edit(ctx: click.Context, prompt: str, images: tuple[str, ...], **options: Any) -> None:
    """Edit or combine IMAGES (paths, URLs or data: URIs) as PROMPT says."""
    run(ctx, prompt, list(images), options, image_option=None)


def run(
    ctx: click.Context, prompt: str, images: list[str], options: dict[str, Any], *, image_option: str | None
) -> None:
    """Everything that can be refused is refused before the model loads: settings, the request, the folder."""
    from atelier.studio import Atelier

    if options["quiet"]:  # read by huggingface_hub, diffusers and transformers when they are imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    choice = choose_model(ctx, options["model"], options["model_path"])
    if options.get("openai_api_key") and choice.chosen_by is not None:
        raise Problems(
            [f"--openai-api-key sends the request to OpenAI, but {choice.chosen_by} names a local model; drop one"]
        )
    settings = settings_for(ctx, choice)
    if needs_a_key(settings, choice.chosen_by, options.get("openai_api_key")):
        raise Problems([
            "ATELIER_ENGINE=openai sends the request to OpenAI, and no key is set: pass --openai-api-key, "
            "or set OPENAI_API_KEY (or ATELIER_OPENAI_API_KEY_FILE)"
        ])  # fmt: skip
    fields = {name: options[name] for name in FIELD_OPTIONS if options.get(name) is not None}
    if options["mask"] is not None:  # a masked edit keeps the image's shape: any other is refused
        fields.setdefault("aspect_ratio", "auto")
    seed = None if options["seed"] in (None, -1) else options["seed"]
    try:
        if options.get("openai_api_key_file") is not None:
            fields["openai_api_key"] = key_from_file(
                options["openai_api_key_file"], also_given=options["openai_api_key"]
            )
        request = parse_request({"prompt": prompt, **fields, **({"input_images": images} if images else {})})
        make_folder(options["out"])
        studio = Atelier(
            choice.model, model_path=choice.model_path, settings=settings, progress_bars=not options["quiet"]
        )
        with Progress(enabled=not options["quiet"]) as progress:
            result = studio.run(request, seed=seed, progress=progress, allow_paths=True, mask=options["mask"])
    except InputError as exc:
        raise Problems(problem_lines(exc.problems, image_namer(images, image_option))) from None
    for path in result.save(options["out"]):
        click.echo(str(path))
    note = f"{result.model}: {len(result.images)}x {result.size} {request.output_format}, seed {result.seed}"
    if result.upscaled:  # refine: enlarged, then redrawn at the full size; resize: enlarged only
        how = "redrawn at full size" if result.size_method == "refine" else "upscaled"
        note += f", rendered at {result.rendered_size} and {how}"
    click.echo(note + text_check_note(result.metrics), err=True)


def text_check_note(metrics: dict[str, Any]) -> str:
    """``; text read 'OPEN LATE' (accuracy 1.00, best of 2)`` when the text check ran, else nothing."""
    if "text_accuracy" not in metrics:
        return ""
    read = ", ".join(repr(text) for text in metrics["text_read"])
    return f"; text read {read} (accuracy {metrics['text_accuracy']:.2f}, best of {metrics['text_candidates']})"


def key_from_file(path: str, *, also_given: str | None) -> str:
    """The key in ``path`` (``-``: stdin), stripped; a problem names --openai-api-key-file, never the contents."""
    field = "openai_api_key_file"
    if also_given is not None:
        raise InputError(
            FieldProblem(field, "give the key once: --openai-api-key or --openai-api-key-file", "conflict")
        )
    where = "stdin" if path == "-" else repr(path)
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(FieldProblem(field, f"cannot read {where}: {exc.strerror or exc}", "unreadable")) from None
    except UnicodeDecodeError:
        raise InputError(
            FieldProblem(field, f"{where} is not UTF-8 text; it must hold the key only", "format")
        ) from None
    key = text.strip()
    if not key:
        raise InputError(FieldProblem(field, f"{where} is empty; it must hold the key (sk-...)", "required"))
    if len(key.split()) > 1:
        raise InputError(FieldProblem(field, f"{where} holds more than one word; it must hold the key only", "format"))
    return key


def needs_a_key(settings: Settings, chosen_by: str | None, key: str | None) -> bool:
    """The request would go to OpenAI (no local model named) with no key at all."""
    return settings.default_engine == "openai" and chosen_by is None and not key and not settings.operator_openai_key()


def make_folder(folder: Path) -> None:
    """The output folder, made now: a folder that cannot be written is found before any model time."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Problems(
            [f"--out: cannot create {folder}: {exc.strerror or exc}; choose a folder you can write"]
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Problems([f"--out: {folder} is not writable by this user; choose a folder you can write"])


class Progress:
    """A tqdm bar fed by engine progress events, on stderr."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, desc="denoising", unit="step", leave=False)
        self.bar.n = event.step
        self.bar.refresh()
