"""The OpenAI upstream engine against a stand-in OpenAI server over real HTTP: mapping and failures."""

import base64
import io
import threading

import pytest
from PIL import Image

from atelier import Atelier
from atelier.config import Settings
from atelier.engines.base import CancelToken
from atelier.engines.openai import OpenAIEngine, Prices, scrub
from atelier.errors import Canceled, EngineError, ModerationBlocked, TooManyRequests, UnsupportedRequest
from atelier.request import parse_request

KEY = "sk-test-caller-key-1234567890"


def studio(standin, **settings):
    values = {"openai_base_url": standin.url, "openai_max_retries": 0, "openai_timeout": 10.0, **settings}
    return Atelier(settings=Settings(**values))


def upstream(standin, **kw):
    return studio(standin).generate("a lighthouse", openai_api_key=KEY, **kw)


def png(size=(64, 48), color=(200, 0, 0)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("aspect_ratio", "size"),
    [
        ("1:1", "1024x1024"),
        ("3:2", "1536x1024"),
        ("16:9", "2048x1152"),
        ("9:16", "1152x2048"),
        ("3840x2160", "3840x2160"),
        ("auto", "auto"),
    ],
)
def test_sizes_are_sent_as_openai_sizes(openai_standin, aspect_ratio, size):
    result = upstream(openai_standin, aspect_ratio=aspect_ratio)
    assert openai_standin.requests[-1].json["size"] == size
    expected = "1024x1024" if size == "auto" else size
    assert result.size == expected and result.images[0].size == expected


def test_every_field_is_mapped(openai_standin):
    upstream(
        openai_standin, number_of_images=2, quality="high", background="transparent", output_format="webp",
        output_compression=55, moderation="low", user_id="user-42",
    )  # fmt: skip
    sent = openai_standin.requests[-1].json
    assert sent == {
        "model": "gpt-image-2", "prompt": "a lighthouse", "n": 2, "size": "1024x1024", "quality": "high",
        "background": "transparent", "output_format": "webp", "output_compression": 55, "moderation": "low",
        "user": "user-42", "safety_identifier": "user-42",
    }  # fmt: skip
    assert openai_standin.requests[-1].headers["authorization"] == f"Bearer {KEY}"


def test_png_sends_no_lossy_compression_and_keeps_openais_bytes(openai_standin):
    result = upstream(openai_standin, output_format="png", number_of_images=3)
    assert "output_compression" not in openai_standin.requests[-1].json
    assert [image.format for image in result.images] == ["png"] * 3
    assert len({image.data for image in result.images}) == 3  # as sent, not re-encoded copies


def test_input_images_and_mask_make_an_edits_call(openai_standin):
    engine = studio(openai_standin)
    request = parse_request(
        {"prompt": "add a hat", "input_images": [png(), png(color=(0, 0, 200))], "openai_api_key": KEY}
    )
    job = engine.prepare(request)
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    from dataclasses import replace

    result = engine.setup(engine.engine_for(request)).generate(
        replace(job, mask=mask), progress=lambda e: None, cancel=CancelToken()
    )
    sent = openai_standin.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert [f.field for f in sent.files] == ["image[]", "image[]", "mask"]
    assert sent.files[1].open().getpixel((0, 0))[:3] == (0, 0, 200)
    assert result.images[0].format == "webp"


def test_user_id_goes_with_edits_too(openai_standin):
    request = parse_request(
        {"prompt": "add a hat", "input_images": [png()], "user_id": "user-42", "openai_api_key": KEY}
    )
    studio(openai_standin).run(request)
    sent = openai_standin.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.form["user"] == sent.form["safety_identifier"] == "user-42"


def test_edits_cannot_relax_moderation(openai_standin):
    request = parse_request({"prompt": "x", "input_images": [png()], "moderation": "low", "openai_api_key": KEY})
    with pytest.raises(UnsupportedRequest, match="edits endpoint has no moderation setting"):
        studio(openai_standin).run(request)
    assert openai_standin.requests == []


def test_a_mask_must_match_the_first_image(openai_standin):
    from dataclasses import replace

    from atelier.errors import InputError

    engine = OpenAIEngine(api_key="sk-op", base_url=openai_standin.url)
    job = Atelier(engine=engine).prepare(parse_request({"prompt": "x", "input_images": [png()]}))
    with pytest.raises(InputError, match="mask: is 10x10 but the first image is 64x48"):
        engine.check(replace(job, mask=Image.new("L", (10, 10))))


def test_the_logs_say_the_request_went_upstream_while_openai_works(openai_standin):
    """A render takes OpenAI minutes: until it answers, that log line is all a prediction's logs and stream
    have to show (without it a stream had nothing to send, and a client waiting for a first event hung)."""
    from concurrent.futures import ThreadPoolExecutor

    engine = OpenAIEngine(api_key="sk-op", base_url=openai_standin.url, max_retries=0)
    job = Atelier(engine=engine).prepare(parse_request({"prompt": "a slow one"}))
    messages: list[str] = []
    openai_standin.hold()
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(
                engine.generate, job, progress=lambda e: messages.append(e.message), cancel=CancelToken()
            )
            openai_standin.wait_for_parked(1)
            assert messages == ["Sent to OpenAI (gpt-image-2); waiting for its images"]
            openai_standin.release()
            assert len(call.result(timeout=30).images) == 1
    finally:
        openai_standin.release()
        engine.close()
    assert messages[1] == f"OpenAI request id: {openai_standin.requests[-1].request_id}"


def test_calls_share_one_connection_pool_across_keys_and_close_releases_it(openai_standin):
    def loops() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "atelier-openai"}

    others = loops()  # other tests' engines, not closed
    engine = OpenAIEngine(api_key="sk-op", base_url=openai_standin.url, max_retries=0)
    with Atelier(engine=engine) as atelier:
        atelier.generate("x")
        atelier.generate("y", openai_api_key=KEY)  # the caller's key, the same connections
        atelier.generate("z")
        assert len({r.peer for r in openai_standin.requests}) == 1  # one kept-alive TCP connection
        assert [r.headers["authorization"] for r in openai_standin.requests] == [
            "Bearer sk-op",
            f"Bearer {KEY}",
            "Bearer sk-op",
        ]
        (thread,) = loops() - others  # one loop thread for the engine, started on first use
    assert not thread.is_alive()  # close stopped it
    assert len(Atelier(engine=engine).generate("again").images) == 1  # and a later call starts it again
    engine.close()


def test_usage_is_logged_and_priced(openai_standin):
    events = []
    result = studio(openai_standin).generate("a lighthouse", openai_api_key=KEY, quality="low", progress=events.append)
    usage = result.usage
    assert usage["output_tokens"] == 196
    assert result.cost == pytest.approx(Prices().cost(usage))
    assert result.cost == pytest.approx(0.006, abs=0.001)  # COMPAT: 1024x1024 low ≈ $0.006
    messages = "\n".join(e.message for e in events if e.message)
    assert "Input text token count:" in messages and "Output token count: 196" in messages


def test_rate_limits_are_retried_honouring_retry_after(openai_standin):
    openai_standin.fail_next("rate_limit", retry_after_ms=50, times=2)
    result = studio(openai_standin, openai_max_retries=2).generate("x", openai_api_key=KEY)
    assert len(result.images) == 1
    assert [r.status for r in openai_standin.requests] == [429, 429, 200]


def test_exhausted_rate_limits_are_a_429(openai_standin):
    openai_standin.fail_next("rate_limit", retry_after=7)
    with pytest.raises(TooManyRequests) as info:
        upstream(openai_standin)
    assert info.value.retry_after == 7


def test_server_errors_are_retried_then_reported(openai_standin):
    openai_standin.fail_next("server_error")
    assert studio(openai_standin, openai_max_retries=1).generate("x", openai_api_key=KEY).images
    openai_standin.fail_next("bad_gateway")
    with pytest.raises(EngineError, match=r"OpenAI failed \(502\)") as info:
        upstream(openai_standin)
    assert info.value.status == 502


def test_moderation_blocks_carry_openais_message(openai_standin):
    openai_standin.fail_next("moderation_blocked")
    with pytest.raises(ModerationBlocked, match="safety system") as info:
        upstream(openai_standin)
    assert info.value.code == "moderation_blocked"


def test_other_client_errors_carry_openais_param(openai_standin):
    openai_standin.fail_next("bad_request", param="prompt", message="Your prompt is too spicy.")
    with pytest.raises(EngineError, match="too spicy") as info:
        upstream(openai_standin)
    assert (info.value.status, info.value.field) == (400, "prompt")


@pytest.mark.parametrize(
    ("fault", "words"), [("drop", "could not reach OpenAI at"), ("malformed", "malformed response")]
)
def test_broken_connections_and_bodies_are_clear_errors(openai_standin, fault, words):
    openai_standin.fail_next(fault)
    with pytest.raises(EngineError, match=words):
        upstream(openai_standin)


def test_slow_upstream_hits_the_timeout(openai_standin):
    openai_standin.fail_next("slow", seconds=3)
    with pytest.raises(EngineError, match="did not answer within 1s"):
        studio(openai_standin, openai_timeout=1.0).generate("x", openai_api_key=KEY)


def test_a_rejected_key_names_the_field_and_never_echoes_the_key(openai_standin):
    openai_standin.fail_next("unauthorized")
    with pytest.raises(EngineError) as info:
        upstream(openai_standin)
    assert info.value.field == "openai_api_key" and info.value.status == 400
    assert "sk-" not in str(info.value) and "1234" not in str(info.value)


def test_cancel_aborts_the_upstream_call(openai_standin):
    import threading

    openai_standin.hold()
    cancel = CancelToken()
    threading.Timer(0.5, cancel.cancel, args=("user asked",)).start()
    try:
        with pytest.raises(Canceled, match="user asked"):
            studio(openai_standin).generate("x", openai_api_key=KEY, cancel=cancel)
        openai_standin.wait_for_disconnects(1)
    finally:
        openai_standin.release()


def test_streaming_forwards_partial_images(openai_standin):
    engine = studio(openai_standin)
    request = parse_request({"prompt": "x", "openai_api_key": KEY, "output_format": "png"})
    job = engine.prepare(request, previews=2)
    events = []
    result = engine.setup(engine.engine_for(request)).generate(job, progress=events.append, cancel=CancelToken())
    previews = [e.preview for e in events if e.preview is not None]
    assert len(previews) == 2 and previews[0].size == (1024, 1024)
    assert openai_standin.requests[-1].json["partial_images"] == 2 and len(result.images) == 1


def test_the_operators_key_serves_callers_without_one(openai_standin):
    result = studio(openai_standin, engine="openai", openai_api_key="sk-operator-key").generate("x")
    assert result.engine == "openai"
    assert openai_standin.requests[-1].headers["authorization"] == "Bearer sk-operator-key"


def test_no_key_anywhere_is_a_clear_error(openai_standin):
    with pytest.raises(UnsupportedRequest, match="pass your key as openai_api_key"):
        studio(openai_standin, engine="openai").generate("x")
    assert openai_standin.requests == []


def test_the_operator_key_can_come_from_a_file(openai_standin, tmp_path):
    (tmp_path / "key").write_text("sk-from-a-file\n")
    studio(openai_standin, openai_api_key_file=tmp_path / "key").generate("x")
    assert openai_standin.requests[-1].headers["authorization"] == "Bearer sk-from-a-file"


def test_scrub_removes_keys_and_masked_fragments():
    assert scrub(f"bad key {KEY} and sk-te****1234.", KEY) == "bad key [REDACTED] and [REDACTED]"


def test_scrub_removes_the_masked_fragment_of_a_key_of_any_shape():
    azure_like = "0123456789abcdef0123456789abcdef"  # no "sk-": OpenAI's 401 still quotes 01234****cdef
    said = "Incorrect API key provided: 01234****cdef. You can find your API key at https://example.com."
    assert (
        scrub(said, azure_like)
        == "Incorrect API key provided: [REDACTED] You can find your API key at https://example.com."
    )


@pytest.mark.parametrize(
    ("header", "expected"), [("7", 7.0), ("³", 5.0), ("Wed, 21 Oct 2026 07:28:00 GMT", 5.0), (None, 5.0)]
)
def test_retry_after_headers_that_are_not_plain_seconds_fall_back(header, expected):
    from atelier.engines.openai import seconds

    assert seconds(header, default=5.0) == expected


def test_the_upstream_is_checked_once_and_sent_the_planned_size(openai_standin, monkeypatch):
    """``prepare`` checks the job once and the plan (the OpenAI size) goes with it; generate sends that size
    without checking again, and the plan is stored as JSON and loaded back equal."""
    from atelier.engines.base import dump_plan, load_plan
    from atelier.engines.openai import UpstreamPlan

    atelier = studio(openai_standin)
    request = parse_request({"prompt": "a lighthouse", "aspect_ratio": "3:2", "openai_api_key": KEY})
    engine = atelier.engine_for(request)
    checks = []
    check = engine.check
    monkeypatch.setattr(engine, "check", lambda job: checks.append(job.id) or check(job))
    job = atelier.prepare(request)
    assert job.plan == UpstreamPlan("1536x1024") and checks == [job.id]
    assert load_plan(engine, dump_plan(job.plan)) == job.plan
    atelier.setup(engine).generate(job, progress=lambda e: None, cancel=CancelToken())
    assert openai_standin.requests[-1].json["size"] == "1536x1024" and checks == [job.id]
