"""The web playground in a real headless Chromium, against a real ``atelier serve`` with a tiny FLUX.2.

The browser is Debian's ``chromium`` (found on PATH, or ``ATELIER_CHROMIUM``) driven by the
``playwright`` package; Playwright's own browser downloads are never used. Without either, every test
here skips with a message saying what to install. Screenshots of the main states are written to
``test-artifacts/playground/`` for a person to look at; nothing asserts on pixels or timings.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import Server, start_server

try:
    from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
except ImportError:  # the tests skip below, with a message
    sync_playwright = None

pytestmark = pytest.mark.slow

CHROMIUM = Path(
    os.environ.get("ATELIER_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or "/usr/bin/chromium"  # Debian's package
)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
SEED = "openai/gpt-image-2"
TOKEN = "e2e-playground-token-0123456789"
RUN_TIMEOUT = 180_000  # ms: a tiny model on a busy CI machine; a bound on waiting, never a timing check
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Listed first in every test, so a missing browser skips before any server is started."""
    if sync_playwright is None:
        pytest.skip("the playwright package is not installed: pip install -c constraints.txt -e '.[dev]'")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set ATELIER_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def token_server(tiny_flux2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("playground-tokens") / "data", tiny_flux2, env={"ATELIER_API_TOKENS": TOKEN}
    )
    yield running
    running.stop()


def open_page(browser: Browser, viewport: dict[str, int] = DESKTOP, **options: Any) -> tuple[Page, list[str]]:
    context = browser.new_context(viewport=viewport, accept_downloads=True, **options)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))  # uncaught exceptions in the page's JS
    return page, errors


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened, errors = open_page(browser)
    yield opened
    opened.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


# -- helpers -------------------------------------------------------------------------------------------


def visit(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("#f-prompt")).to_be_visible()


def shot(page: Page, name: str, *, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def fill_form(page: Page, prompt: str, *, aspect: str | None = None, **radios: str) -> None:
    page.fill("#f-prompt", prompt)
    if aspect:
        page.select_option("#f-aspect_ratio", aspect)
    for field, value in radios.items():
        page.check(f"#f-{field}-{value}")


def submit(page: Page, key: str | None = None) -> str:
    """Press Generate (or ``key``); the id of the prediction it created, once the page follows it."""
    before = page.get_attribute("#run", "data-prediction") or ""
    if key:
        page.keyboard.press(key)
    else:
        page.click("#submit")
    page.wait_for_function(
        "(before) => (document.querySelector('#run').dataset.prediction || '') !== before", arg=before
    )
    return page.get_attribute("#run", "data-prediction") or ""


def wait_done(page: Page, outcome: str = "succeeded") -> None:
    expect(page.locator("#run")).to_have_attribute("data-status", outcome, timeout=RUN_TIMEOUT)


def natural_sizes(page: Page) -> list[tuple[int, int]]:
    images = page.locator("#gallery .result img")
    expect(images.first).to_be_visible()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)"
    )
    return [tuple(size) for size in images.evaluate_all("all => all.map(i => [i.naturalWidth, i.naturalHeight])")]


def api(server: Server, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def fetch(server: Server, prediction_id: str, token: str | None = None) -> dict[str, Any]:
    with api(server, token) as client:
        return client.get(f"/v1/predictions/{prediction_id}").json()


def api_problems(server: Server, input: dict[str, Any]) -> dict[str, str]:
    """What the API itself says about ``input``: field -> description."""
    with api(server) as client:
        response = client.post(f"/v1/models/{SEED}/predictions", json={"input": input})
    assert response.status_code == 422, response.text
    return {p["field"]: p["description"] for p in response.json()["invalid_fields"]}


def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def unnamed_controls(page: Page) -> list[str]:
    """Controls whose accessible name, as Chromium computes it for assistive technology, is empty."""
    session = page.context.new_cdp_session(page)
    tree = session.send("Accessibility.getFullAXTree")["nodes"]
    roles = {"button", "link", "textbox", "combobox", "radio", "slider", "spinbutton", "checkbox", "listbox"}
    return [
        f"{node['role']['value']} (backend node {node.get('backendDOMNodeId')})"
        for node in tree
        if not node.get("ignored")
        and node.get("role", {}).get("value") in roles
        and not (node.get("name", {}).get("value") or "").strip()
    ]


# -- tests ---------------------------------------------------------------------------------------------


def test_the_form_is_built_from_the_models_schema_with_its_defaults(
    browser: Browser, page: Page, server: Server
) -> None:
    visit(page, server)
    with api(server) as client:
        schema = client.get(f"/v1/models/{SEED}").json()["latest_version"]["openapi_schema"]["components"]["schemas"]
    properties = schema["Input"]["properties"]
    assert (
        page.locator("#f-aspect_ratio option").evaluate_all("all => all.map(o => o.value)")
        == (schema["aspect_ratio"]["enum"])
    )
    assert page.input_value("#f-aspect_ratio") == properties["aspect_ratio"]["default"]
    for field in ("quality", "background", "output_format", "moderation"):
        assert page.locator(f"input[name='f-{field}']:checked").input_value() == properties[field]["default"]
    assert page.input_value("#f-number_of_images") == str(properties["number_of_images"]["default"])
    assert page.input_value("#f-output_compression") == str(properties["output_compression"]["default"])
    assert page.get_attribute("#f-number_of_images", "max") == str(properties["number_of_images"]["maximum"])
    page.click("summary:has-text('Key and user id')")
    assert page.get_attribute("#f-openai_api_key", "type") == "password"
    assert unnamed_controls(page) == []
    shot(page, "form")


def test_generate_shows_progress_and_a_result_of_the_requested_size(
    browser: Browser, page: Page, server: Server
) -> None:
    visit(page, server)
    fill_form(page, "a lighthouse on a cliff at dusk", aspect="3:2", quality="low", output_format="png")
    created = submit(page)
    wait_done(page)
    assert natural_sizes(page) == [(1536, 1024)]
    expect(page.locator("#gallery .preview")).to_have_count(0)  # the results replaced the step previews
    expect(page.locator("#gallery figcaption").first).to_contain_text("1536×1024 · PNG")
    # The progress bar was fed by the stream's log lines and ends full.
    assert re.search(r"\d+/\d+ \[", page.text_content("#logs") or "")
    progress = page.locator("#progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") != "1"
    prediction = fetch(server, created)
    assert prediction["status"] == "succeeded" and prediction["input"]["prompt"] == "a lighthouse on a cliff at dusk"
    expect(page.locator("[data-metric=seed] dd")).to_have_text(str(prediction["metrics"]["seed"]))
    expect(page.locator("[data-metric=cost] dd")).to_have_text(re.compile(r"^\$\d+\.\d+$"))
    expect(page.locator("[data-metric=predict_time] dd")).to_have_text(re.compile(r"^\d+\.\d+ s$"))
    shot(page, "result")
    download = page.locator("#gallery a[download]").first
    assert download.get_attribute("href") == prediction["output"][0]
    with page.expect_download() as downloading:
        download.click()
    saved = downloading.value
    assert saved.suggested_filename.endswith(".png")
    assert Image.open(saved.path()).size == (1536, 1024)


def test_cancel_stops_a_running_prediction(browser: Browser, page: Page, server: Server) -> None:
    visit(page, server)
    fill_form(page, "a very detailed city at night", quality="high")
    page.fill("#f-number_of_images", "10")  # slow enough on the tiny model to be caught running
    created = submit(page)
    # Live progress from the SSE stream: a step counted while the prediction is still running.
    page.wait_for_function(
        "() => Number(document.querySelector('#progress').getAttribute('value')) >= 1", timeout=RUN_TIMEOUT
    )
    expect(page.locator("#progress-text")).to_contain_text("Step")
    shot(page, "progress")
    page.click("#cancel")
    wait_done(page, "canceled")
    expect(page.locator("#status")).to_have_text("Canceled.")
    expect(page.locator("#cancel")).to_be_hidden()
    assert page.locator("#gallery .result").count() == 0
    assert fetch(server, created)["status"] == "canceled"
    expect(page.locator("#history-list li").first).to_have_attribute("data-status", "canceled")
    shot(page, "canceled")


def test_step_previews_appear_while_the_model_runs(browser: Browser, page: Page, server: Server) -> None:
    with api(server) as client:
        model = client.get(f"/v1/models/{SEED}").json()
    assert (model["engine"], model["previews"]) == ("diffusers", 3)  # a local model: previews cost nothing
    visit(page, server)
    fill_form(page, "a harbour at dawn", quality="high")
    page.fill("#f-number_of_images", "10")  # slow enough on the tiny model to be seen running
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/predictions")) as creating:
        submit(page)
    assert creating.value.post_data_json["previews"] == 3
    # Polled on every animation frame: a preview is on screen, decoded, while the prediction runs.
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery .preview img'); return i && i.complete && i.naturalWidth; }",
        timeout=RUN_TIMEOUT,
    )
    preview = page.locator("#gallery .preview img")
    assert (preview.get_attribute("src") or "").startswith("data:image/webp;base64,")
    where = r"Preview of image 1 at step \d+ of \d+"
    assert re.fullmatch(where + ": a harbour at dawn", preview.get_attribute("alt") or "")
    expect(page.locator("#gallery .preview figcaption")).to_contain_text(re.compile(where))
    assert preview.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [512, 512]  # scaled down from 1024
    assert page.get_attribute("#run", "data-status") in ("starting", "processing")  # not finished yet
    shot(page, "preview")
    page.click("#cancel")  # the rest of the run would only take time
    wait_done(page, "canceled")
    expect(page.locator("#gallery .preview")).to_have_count(0)


def test_a_result_can_be_used_as_the_input_of_an_edit(browser: Browser, page: Page, server: Server) -> None:
    visit(page, server)
    fill_form(page, "a red apple on a table", quality="low", output_format="png", background="transparent")
    submit(page)
    wait_done(page)
    output = page.locator("#gallery a[download]").first.get_attribute("href")
    assert output
    expect(page.locator("#gallery .frame").first).to_have_class(re.compile(r"\bchecker\b"))  # alpha shows
    assert Image.open(io.BytesIO(httpx.get(output, timeout=30).content)).mode == "RGBA"
    page.click("#gallery button:has-text('Use as input')")
    expect(page.locator(f".thumbs li[data-url='{output}'] img")).to_be_visible()
    reused = "Result 1 of “a red apple on a table”"  # where it came from, not a file id
    expect(page.locator(f".thumbs li[data-url='{output}'] .thumb-name")).to_have_text(reused)
    expect(page.locator("#f-prompt")).to_be_focused()  # ready to describe the edit
    fill_form(page, "the same apple, but green", background="opaque", output_format="webp")
    created = submit(page)
    wait_done(page)
    prediction = fetch(server, created)
    assert prediction["input"]["input_images"] == [output]
    assert prediction["input"]["prompt"] == "the same apple, but green"
    assert natural_sizes(page) == [(1024, 1024)]
    expect(page.locator("#gallery .frame").first).not_to_have_class(re.compile(r"\bchecker\b"))  # opaque
    shot(page, "edit")
    page.click("#reset")
    expect(page.locator(".thumbs li")).to_have_count(0)
    page.locator(f"#history-list li[data-id='{created}']").get_by_role("button", name="Load inputs").click()
    expect(page.locator(f".thumbs li[data-url='{output}'] img")).to_be_visible()
    assert page.input_value("#f-prompt") == "the same apple, but green"
    # Loaded back from the history, it is still named by where it came from (asked of the Files API).
    expect(page.locator(f".thumbs li[data-url='{output}'] .thumb-name")).to_have_text(reused)


def test_input_images_by_upload_drop_and_url(browser: Browser, page: Page, server: Server, tmp_path: Path) -> None:
    visit(page, server)
    picked = tmp_path / "picked.png"
    picked.write_bytes(png_bytes((96, 64), (200, 30, 30)))
    page.set_input_files("#f-input_images", str(picked))
    dropped = base64.b64encode(png_bytes((64, 64), (30, 30, 200))).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const zone = document.querySelector("[data-dropzone]");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
            }
        }""",
        dropped,
    )
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64), (30, 200, 30))).decode()
    page.fill("#f-input_images-url", data_uri)
    page.press("#f-input_images-url", "Enter")  # adds the URL; does not submit the form
    uploaded = page.locator(".thumbs li[data-url*='/v1/files/']")
    expect(uploaded).to_have_count(2)  # both files went through POST /v1/files
    expect(page.locator(".thumbs li img")).to_have_count(3)
    fill_form(page, "combine these colours", aspect="1:1", quality="low")
    shot(page, "inputs")
    created = submit(page)
    wait_done(page)
    images = fetch(server, created)["input"]["input_images"]
    assert [re.sub(r"/v1/files/\w+$", "/v1/files/ID", u) for u in images[:2]] == [f"{server.url}/v1/files/ID"] * 2
    assert images[2] == data_uri
    page.click(".thumbs li:first-child button.remove")
    expect(page.locator(".thumbs li")).to_have_count(2)
    # Loading the inputs back shows the uploads again (fetched with the caller's access, not by URL).
    page.locator(f"#history-list li[data-id='{created}']").get_by_role("button", name="Load inputs").click()
    thumbs = page.locator(".thumbs li img")
    expect(thumbs).to_have_count(3)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.thumbs img')].every(i => i.complete && i.naturalWidth)"
    )
    assert thumbs.first.get_attribute("src").startswith("blob:")
    names = page.locator(".thumbs li .thumb-name")
    expect(names.first).to_have_text("picked.png (uploaded)")
    expect(names.nth(1)).to_have_text("dropped.png (uploaded)")


def test_the_apis_validation_messages_are_shown_next_to_their_fields(
    browser: Browser, page: Page, server: Server
) -> None:
    visit(page, server)
    with api(server) as client:
        before = len(client.get("/v1/predictions").json()["results"])
    page.click("#submit")  # an empty prompt: the one check made in the page, in the API's own words
    expected = api_problems(server, {})["input.prompt"]
    expect(page.locator("[data-field=prompt] .field-error")).to_have_text(expected)
    expect(page.locator("#f-prompt")).to_be_focused()

    fill_form(page, "a glass of water")
    page.fill("#f-number_of_images", "11")
    page.click("#submit")
    expected = api_problems(server, {"prompt": "a glass of water", "number_of_images": 11})
    expect(page.locator("[data-field=number_of_images] .field-error")).to_have_text(expected["input.number_of_images"])
    assert page.get_attribute("#f-number_of_images", "aria-invalid") == "true"
    expect(page.locator("[data-field=prompt] .field-error")).to_be_empty()

    page.fill("#f-number_of_images", "2")
    fill_form(page, "a glass of water", background="transparent", output_format="jpeg")
    page.click("#submit")
    expected = api_problems(server, {"prompt": "x", "background": "transparent", "output_format": "jpeg"})
    # The API's words, with its field names as the labels on screen ("output_format" is "Output format").
    said = expected["input.background"]
    assert "output_format" in said
    expect(page.locator("[data-field=background] .field-error")).to_have_text(
        said.replace("output_format", "Output format")
    )
    expect(page.locator("[data-field=number_of_images] .field-error")).to_be_empty()
    expect(page.locator("#status")).to_contain_text("The API refused the input")
    shot(page, "validation")
    with api(server) as client:
        assert len(client.get("/v1/predictions").json()["results"]) == before  # nothing was created


def test_history_pages_through_next_and_loads_inputs_into_the_form(
    browser: Browser, page: Page, server: Server
) -> None:
    older = {
        "prompt": "history: a paper boat", "aspect_ratio": "2:3", "output_format": "jpeg", "quality": "low",
        "number_of_images": 2, "moderation": "low", "user_id": "u-42", "output_compression": 55,
    }  # fmt: skip
    with api(server) as client:
        for body in (older, {"prompt": "history: the newest one", "quality": "low"}):
            response = client.post(f"/v1/models/{SEED}/predictions", json={"input": body}, headers={"Prefer": "wait"})
            assert response.json()["status"] == "succeeded", response.text

    # The server's pages hold 100 predictions; cut the first one to a single item so that following
    # its `next` URL (a real cursor, answered by the real server) is exercised.
    def first_page_of_one(route: Route) -> None:
        response = route.fetch()
        page_one = response.json()
        first = page_one["results"][0]
        cursor = base64.urlsafe_b64encode(f"{first['created_at']}|{first['id']}".encode()).decode().rstrip("=")
        page_one.update(results=[first], next=f"{server.url}/v1/predictions?cursor={cursor}")
        route.fulfill(response=response, json=page_one)

    is_first_page = lambda url: urllib.parse.urlsplit(url).path == "/v1/predictions" and "cursor=" not in url  # noqa: E731
    page.route(is_first_page, first_page_of_one)
    visit(page, server)
    items = page.locator("#history-list li")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("history: the newest one")
    page.click("#history-more")
    boat = items.filter(has_text="history: a paper boat")
    expect(boat).to_have_count(1)
    boat.get_by_role("button", name="Load inputs").click()
    assert page.input_value("#f-prompt") == older["prompt"]
    assert page.input_value("#f-aspect_ratio") == "2:3"
    assert page.input_value("#f-number_of_images") == "2"
    assert page.input_value("#f-output_compression") == "55"
    assert page.input_value("#f-user_id") == "u-42"
    for field in ("output_format", "quality", "moderation"):
        assert page.locator(f"input[name='f-{field}']:checked").input_value() == older[field]
    boat.get_by_role("button", name="Show").click()
    assert natural_sizes(page) == [(1024, 1536), (1024, 1536)]
    shot(page, "history")


def test_token_entry_when_the_server_requires_tokens(browser: Browser, token_server: Server) -> None:
    page, errors = open_page(browser)
    page.goto(f"{token_server.url}/")
    expect(page.locator("#token-panel")).to_be_visible()
    expect(page.locator("#token-input")).to_be_focused()
    shot(page, "token")
    page.fill("#token-input", "not-the-token")
    page.press("#token-input", "Enter")
    expect(page.locator("#token-error")).to_contain_text("did not accept")
    page.fill("#token-input", TOKEN)
    page.press("#token-input", "Enter")
    expect(page.locator("#f-prompt")).to_be_visible()
    expect(page.locator("#token-panel")).to_be_hidden()

    fill_form(page, "a key on a ribbon", quality="low", output_format="webp")
    created = submit(page)
    wait_done(page)
    assert natural_sizes(page) == [(1024, 1024)]
    assert fetch(token_server, created, TOKEN)["input"]["prompt"] == "a key on a ribbon"

    # The API token survives a reload of the tab; the OpenAI key is never stored anywhere.
    page.click("summary:has-text('Key and user id')")
    page.fill("#f-openai_api_key", "sk-playground-secret")
    page.reload()
    expect(page.locator("#f-prompt")).to_be_visible()
    expect(page.locator("#token-panel")).to_be_hidden()
    assert page.input_value("#f-openai_api_key") == ""
    stored = page.evaluate("JSON.stringify([{...sessionStorage}, {...localStorage}])")
    assert "sk-playground-secret" not in stored and TOKEN in stored
    assert page.evaluate("localStorage.length") == 0

    page.click("#forget-token")
    expect(page.locator("#token-panel")).to_be_visible()
    page.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def test_phone_sized_screen_has_no_horizontal_scroll(browser: Browser, server: Server) -> None:
    page, errors = open_page(browser, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    visit(page, server)
    no_sideways_scroll = "() => document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(no_sideways_scroll)
    form_box = page.locator("#prompt-form").bounding_box()
    run_box = page.locator("#run").bounding_box()
    assert form_box and run_box and run_box["y"] >= form_box["y"] + form_box["height"]  # one column
    fill_form(page, "a tall window with rain", aspect="9:16", quality="low")
    submit(page)
    wait_done(page)
    assert natural_sizes(page) == [(1152, 2048)]
    assert page.evaluate(no_sideways_scroll)
    shot(page, "phone")
    page.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def test_the_page_can_be_used_with_the_keyboard_alone(browser: Browser, page: Page, server: Server) -> None:
    visit(page, server)
    for _ in range(10):  # from the top of the page to the prompt
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "f-prompt":
            break
    expect(page.locator("#f-prompt")).to_be_focused()
    page.keyboard.type("a small blue boat")
    page.focus("#f-quality-auto")
    page.keyboard.press("ArrowLeft")  # radio groups move with the arrow keys
    assert page.locator("input[name='f-quality']:checked").input_value() == "high"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.locator("input[name='f-quality']:checked").input_value() == "low"
    page.focus("#f-prompt")
    created = submit(page, key="Control+Enter")
    wait_done(page)
    sent = fetch(server, created)["input"]
    assert (sent["prompt"], sent["quality"]) == ("a small blue boat", "low")


# -- issue 14: a playground that explains itself --------------------------------------------------------


def served_models(server: Server) -> list[dict[str, Any]]:
    with api(server) as client:
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        default = client.get(f"/v1/models/{SEED}").json()
        others = [client.get(f"/v1/models/atelier/{n}") for n in names if n not in (default["serves"], "gpt-image-2")]
    return [default, *(r.json() for r in others if r.status_code == 200)]


def test_the_page_describes_the_model_this_server_serves(browser: Browser, page: Page, server: Server) -> None:
    visit(page, server)
    models = served_models(server)
    default = models[0]
    assert default["engine"] == "diffusers"
    header = page.locator("#model-description")
    expect(header).to_have_text(default["description"])
    assert "OpenAI" not in (header.text_content() or "") and default["serves"] in (header.text_content() or "")
    hints = page.text_content("#fields") or ""
    for claim in ("uses proxy", "helps OpenAI monitor", "experimental"):  # the seed's words, untrue here
        assert claim not in hints, claim
    assert "(experimental)" not in " ".join(page.locator("#f-aspect_ratio option").all_text_contents())
    # The picker lists exactly what the server serves, the default first.
    options = page.locator("#f-model option")
    assert options.evaluate_all("all => all.map(o => o.value)") == [SEED] + [
        f"atelier/{m['serves']}" for m in models[1:]
    ]
    expect(options.first).to_contain_text(default["serves"])
    shot(page, "models")
    upstream = next((m for m in models[1:] if m["engine"] == "openai"), None)
    if upstream is not None:  # picking OpenAI changes what the page says and takes
        page.select_option("#f-model", f"atelier/{upstream['serves']}")
        expect(header).to_have_text(upstream["description"])
        expect(page.locator("#f-seed")).to_be_disabled()
        assert "(experimental)" in " ".join(page.locator("#f-aspect_ratio option").all_text_contents())


def test_generate_brings_the_result_and_its_progress_into_view(browser: Browser, server: Server) -> None:
    page, errors = open_page(browser, {"width": 1280, "height": 1000})
    visit(page, server)
    fill_form(page, "a tall lighthouse", quality="low")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # down at the Generate button
    assert page.locator("#run").evaluate("n => n.getBoundingClientRect().top") < 0  # the panel is above
    submit(page)
    expect(page.locator("#progress-row")).to_be_in_viewport()
    expect(page.locator("#status")).to_be_in_viewport()
    wait_done(page)
    shot(page, "scrolled")
    page.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture(scope="module")
def broken_server(tiny_flux2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose model cannot load: its transformer's weights are cut short."""
    folder = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_flux2, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    running = start_server(tmp_path_factory.mktemp("broken-data") / "data", folder, until="SETUP_FAILED")
    yield running
    running.stop()


def test_a_model_that_failed_to_load_is_said_before_generate_and_its_failure_once(
    browser: Browser, page: Page, broken_server: Server
) -> None:
    visit(page, broken_server)
    banner = page.locator("#setup-banner")
    expect(banner).to_be_visible()  # before anyone presses Generate
    expect(banner).to_contain_text("could not be loaded")
    with api(broken_server) as client:
        reason = client.get("/health-check").json()["setup"]["logs"].strip()
    expect(banner).to_contain_text(reason[:60])
    shot(page, "setup-failed")
    fill_form(page, "anything at all", quality="low")
    created = submit(page)
    wait_done(page, "failed")
    error = fetch(broken_server, created)["error"]
    assert error
    expect(page.locator("#run-error")).to_have_text(error)
    assert page.inner_text("#run").count(error) == 1  # said once on screen, not in the status line too
    expect(page.locator("#summary")).to_be_hidden()  # no seed, time or steps of images never made
    shot(page, "failed")


def test_progress_counts_steps_per_call_when_images_run_as_separate_calls(
    browser: Browser, page: Page, server: Server
) -> None:
    visit(page, server)
    fill_form(page, "two small boats", quality="medium")  # "low" draws at half the pixels: two would share a call
    page.fill("#f-number_of_images", "2")  # 1024x1024 each: one image per call on a CPU, so two calls
    created = submit(page)
    wait_done(page)
    logs = fetch(server, created)["logs"]
    assert "(call 2 of 2, " in logs
    steps = fetch(server, created)["metrics"]["steps"]
    expect(page.locator("[data-metric=steps] dd")).to_have_text(str(steps))
    expect(page.locator("#progress-text")).to_contain_text(f"Step {steps} of {steps} · call 2 of 2")
    progress = page.locator("#progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == str(2 * steps)  # the bar: all calls


def test_a_seed_field_reproduces_an_image_and_load_inputs_brings_the_seed_back(
    browser: Browser, page: Page, server: Server
) -> None:
    visit(page, server)
    made = []
    for _ in range(2):
        fill_form(page, "a seeded pear", quality="low", output_format="png")
        page.fill("#f-seed", "4321")
        created = submit(page)
        wait_done(page)
        prediction = fetch(server, created)
        assert prediction["input"]["seed"] == 4321
        expect(page.locator("[data-metric=seed] dd")).to_have_text("4321")
        made.append(httpx.get(prediction["output"][0], timeout=30).content)
    assert made[0] == made[1]  # same seed, same settings: the same file
    page.fill("#f-seed", "-1")
    page.click("#submit")
    expect(page.locator("[data-field=seed] .field-error")).to_contain_text("-1")  # the API's refusal, at the field
    # A prediction made without a seed still loads the one it ran with.
    with api(server) as client:
        unseeded = client.post(
            f"/v1/models/{SEED}/predictions", json={"input": {"prompt": "no seed given", "quality": "low"}},
            headers={"Prefer": "wait"},
        ).json()  # fmt: skip
    page.click("#history-refresh")
    page.locator(f"#history-list li[data-id='{unseeded['id']}']").get_by_role("button", name="Load inputs").click()
    assert page.input_value("#f-seed") == str(unseeded["metrics"]["seed"])
    assert page.input_value("#f-prompt") == "no seed given"


def test_history_items_can_be_deleted(browser: Browser, page: Page, server: Server) -> None:
    with api(server) as client:
        doomed = client.post(
            f"/v1/models/{SEED}/predictions", json={"input": {"prompt": "delete me", "quality": "low"}},
            headers={"Prefer": "wait"},
        ).json()  # fmt: skip
    visit(page, server)
    item = page.locator(f"#history-list li[data-id='{doomed['id']}']")
    delete = item.get_by_role("button", name="Delete")
    delete.click()
    expect(delete).to_have_text("Delete for good")  # asked twice: one slip deletes nothing
    delete.click()
    expect(item).to_have_count(0)
    with api(server) as client:
        assert client.get(f"/v1/predictions/{doomed['id']}").status_code == 404
    assert httpx.get(doomed["output"][0], timeout=30).status_code == 404


def test_the_readme_screenshot(browser: Browser, server: Server) -> None:
    """The run shown in the README (docs/playground.png is copied from test-artifacts/playground/readme.png)."""
    page, errors = open_page(browser, {"width": 1280, "height": 820})
    visit(page, server)
    prompt = "A paper lantern shaped like a fox, soft studio light, isolated product shot"
    fill_form(page, prompt, aspect="3:2", output_format="png", background="transparent")
    page.fill("#f-number_of_images", "2")
    page.fill("#f-seed", "1007213947")
    submit(page)
    wait_done(page)
    assert natural_sizes(page) == [(1536, 1024), (1536, 1024)]
    expect(page.locator("[data-metric=seed] dd")).to_have_text("1007213947")
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "readme", full_page=False)
    page.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
