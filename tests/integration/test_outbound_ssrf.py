"""Webhooks and Cog's ``output_file_prefix`` cannot reach the server's own network, and failed deliveries
tell the caller nothing about it (``atelier.outbound``), checked against a real receiver on loopback.

"Refused" means the receiver never saw a request, not only that an error came back. Names come from a
fake resolver (``socket.getaddrinfo`` patched for the names a test gives); every other lookup is real.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from atelier.api.cog.service import UPLOAD_FAILED
from atelier.jobs.records import utc_now
from doors import REPLICATE_CREATE, Doors, refused, serve
from receivers import Receiver

ASYNC = {"Prefer": "respond-async"}
COMPLETED = {"webhook_events_filter": ["completed"]}

# Hosts refused whatever DNS says: loopback in every spelling a resolver accepts, and its neighbours.
LOOPBACK = {
    "short": "127.1",
    "decimal": "2130706433",
    "hex": "0x7f.1",
    "ipv6": "[::1]",
    "ipv4-mapped": "[::ffff:127.0.0.1]",
    "ipv4-mapped hex": "[::ffff:7f00:1]",
    "localhost": "localhost",
    "localhost, upper case, rooted": "LOCALHOST.",
    "a localhost subdomain": "hooks.localhost",
}
ELSEWHERE = {
    "unspecified (reaches loopback on Linux)": ("0.0.0.0", "an unspecified address"),
    "private": ("10.0.0.1", "a private address"),
    "metadata": ("169.254.169.254", "a cloud metadata address"),
    "metadata as IPv6": ("[::ffff:a9fe:a9fe]", "a cloud metadata address"),
    "metadata, decimal": ("2852039166", "a cloud metadata address"),
    "link-local v6": ("[fe80::1]", "a link-local address"),
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Host name -> the address the resolver gives for it, or a list: one per lookup, the last one for good."""
    table: dict[str, Any] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in table:
            return real(host, port, *args, **kwargs)
        answers = table[host]
        address = answers if isinstance(answers, str) else answers.pop(0) if len(answers) > 1 else answers[0]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


async def create(doors: Doors, door: str, **body: Any) -> Any:
    """A prediction through ``door`` with ``body``'s webhook fields; Cog's answers at once (respond-async)."""
    payload = {"input": {"prompt": "x"}, **body}
    if door == "replicate":
        return await doors.client.post(REPLICATE_CREATE, json=payload)
    return await doors.client.post("/predictions", json=payload, headers=ASYNC)


async def settled(doors: Doors) -> None:
    """Every job finished and every webhook attempt due so far made (Cog takes one prediction at a time)."""
    services = doors.app.state.services
    for prediction in (await services.runner.list(owner=None, cursor=None, limit=100))[0]:
        await services.runner.wait(prediction.id, 5)
    await services.runner.dispatcher.flush(5)
    await doors.app.state.replicate.webhooks.flush(5)
    assert not await doors.app.state.cog.webhooks.flush(5)


def fast_retries(doors: Doors) -> None:
    """Cog's retries at once; Replicate's first retry far off, so its row shows exactly one attempt."""
    doors.app.state.cog.webhooks.backoff = 0.001
    doors.app.state.replicate.webhooks.retry_delays = (600.0,)


def warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- refused at creation: a 4xx naming the field, nothing runs, nothing is sent -------------------------------


@pytest.mark.parametrize("door", ["replicate", "cog"])
@pytest.mark.parametrize("host", LOOPBACK.values(), ids=LOOPBACK.keys())
async def test_a_webhook_to_loopback_in_any_spelling_is_refused_naming_the_field(
    tmp_path: Path, receiver: Receiver, door: str, host: str
) -> None:
    async with serve(tmp_path) as doors:
        response = await create(doors, door, webhook=receiver.url(host), **COMPLETED)
        fields, message = refused(door, response)
        assert fields == [{"replicate": "webhook", "cog": "body.webhook"}[door]]
        assert "a loopback address" in message and "ATELIER_WEBHOOK_ALLOW" in message
        await settled(doors)
        assert receiver.requests == [] and doors.jobs == 0


@pytest.mark.parametrize("door", ["replicate", "cog"])
@pytest.mark.parametrize(("host", "what"), ELSEWHERE.values(), ids=ELSEWHERE.keys())
async def test_a_webhook_to_a_private_or_metadata_address_is_refused(
    tmp_path: Path, door: str, host: str, what: str
) -> None:
    async with serve(tmp_path) as doors:
        fields, message = refused(door, await create(doors, door, webhook=f"http://{host}/hook"))
        assert fields == [{"replicate": "webhook", "cog": "body.webhook"}[door]] and what in message
        assert doors.jobs == 0


async def test_legacy_webhook_completed_is_checked_too(tmp_path: Path, receiver: Receiver) -> None:
    async with serve(tmp_path) as doors:
        fields, message = refused(
            "replicate", await create(doors, "replicate", webhook_completed=receiver.url("127.1"))
        )
        assert fields == ["webhook_completed"] and "a loopback address" in message
        assert receiver.requests == [] and doors.jobs == 0


async def test_an_octal_dotted_quad_is_refused_as_no_url_at_all(tmp_path: Path, receiver: Receiver) -> None:
    async with serve(tmp_path) as doors:
        fields, message = refused("cog", await create(doors, "cog", webhook=receiver.url("0177.0.0.1")))
        assert fields == ["body.webhook"] and "Invalid IPv4 address: '0177.0.0.1'" in message
        assert receiver.requests == [] and doors.jobs == 0


@pytest.mark.parametrize("host", [*LOOPBACK.values(), "169.254.169.254"], ids=[*LOOPBACK.keys(), "metadata"])
async def test_an_output_file_prefix_on_loopback_is_refused_naming_the_field(
    tmp_path: Path, receiver: Receiver, host: str
) -> None:
    async with serve(tmp_path) as doors:
        body = {"input": {"prompt": "x"}, "output_file_prefix": receiver.url(host, "/out/")}
        fields, message = refused("cog", await doors.client.post("/predictions", json=body))
        assert fields == ["body.output_file_prefix"] and "ATELIER_WEBHOOK_ALLOW" in message
        assert receiver.requests == [] and doors.jobs == 0


# -- refused when delivering: a name is judged by the address it resolves to then ---------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
async def test_a_name_resolving_to_loopback_gets_no_delivery(
    tmp_path: Path, receiver: Receiver, names: dict[str, Any], caplog: pytest.LogCaptureFixture, address: str
) -> None:
    """Accepted at creation (no lookup then); at delivery the name resolves to loopback and nothing is sent:
    not the Replicate webhook (a failed attempt, to be retried), not Cog's, not the upload."""
    if address == "::1" and receiver.port6 is None:
        pytest.skip("no IPv6 loopback here")
    names["hooks.example"] = address
    port = receiver.port6 if address == "::1" else receiver.port
    url = f"http://hooks.example:{port}"
    caplog.set_level(logging.WARNING)
    async with serve(tmp_path) as doors:
        fast_retries(doors)
        replicate = (await create(doors, "replicate", webhook=f"{url}/hook", **COMPLETED)).json()
        await settled(doors)
        cog = (await create(doors, "cog", webhook=f"{url}/hook", **COMPLETED)).json()
        await settled(doors)
        upload = await doors.client.post(
            "/predictions", json={"input": {"prompt": "x"}, "output_file_prefix": f"{url}/out/"}
        )
        assert receiver.requests == []
        assert upload.status_code == 502 and upload.json() == {"detail": UPLOAD_FAILED}
        [delivery] = doors.app.state.services.store.due_deliveries(utc_now() + timedelta(hours=1))
        assert delivery.prediction_id == replicate["id"] and delivery.attempts == 1
        assert "a loopback address" in (delivery.last_error or "")
        logged = warnings(caplog)
        for prediction_id in (replicate["id"], cog["id"]):
            assert f"prediction {prediction_id}: " in logged
        assert logged.count("a loopback address") >= 3  # each refusal, with its reason, for the operator


async def test_each_attempt_is_checked_at_the_address_it_resolves_to_then(
    tmp_path: Path, receiver: Receiver, names: dict[str, Any]
) -> None:
    """A trusted name that moves to an untrusted address between two attempts (DNS rebinding): the first
    attempt reaches the receiver, the retry is refused before connecting."""
    names["hooks.example"] = ["127.0.0.1", "127.0.0.2"]
    receiver.statuses.append(500)
    async with serve(tmp_path, webhook_allow=["127.0.0.1/32"]) as doors:
        webhooks = doors.app.state.replicate.webhooks
        webhooks.retry_delays = (0.0, 600.0)  # the retry is due at once, a third attempt never
        url = f"http://hooks.example:{receiver.port}/hook"
        created = (await create(doors, "replicate", webhook=url, **COMPLETED)).json()
        await settled(doors)  # the first attempt
        await webhooks.flush(5)  # the retry (unless the delivery loop made it already)
        [delivery] = doors.app.state.services.store.due_deliveries(utc_now() + timedelta(hours=1))
    assert delivery.attempts == 2
    assert [r.path for r in receiver.requests] == ["/hook"]  # the first attempt only
    assert delivery.prediction_id == created["id"] and "127.0.0.2, a loopback address" in (delivery.last_error or "")


# -- no connection oracle: every failure looks the same to the caller ---------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_failed_upload_says_the_same_whatever_the_cause(
    tmp_path: Path, receiver: Receiver, names: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused address, a closed port, 405 and 500 answer alike; only the operator's log tells them apart."""
    names["elsewhere.example"] = "127.0.0.2"  # loopback too, but not the trusted 127.0.0.1
    receiver.statuses.extend([405, 500])
    causes = {
        "refused address": f"http://elsewhere.example:{receiver.port}/out/",
        "closed port": f"http://127.0.0.1:{closed_port()}/out/",
        "405": receiver.url(path="/out/"),
        "500": receiver.url(path="/out/"),
    }
    caplog.set_level(logging.WARNING)
    async with serve(tmp_path, webhook_allow=["127.0.0.1"]) as doors:
        answers = []
        for prefix in causes.values():
            response = await doors.client.post(
                "/predictions", json={"input": {"prompt": "x"}, "output_file_prefix": prefix}
            )
            answers.append((response.status_code, response.json()))
    assert answers == [(502, {"detail": UPLOAD_FAILED})] * len(causes)
    assert [r.method for r in receiver.requests] == ["PUT", "PUT"]  # the refused address was never reached
    logged = warnings(caplog)
    for reason in ("127.0.0.2, a loopback address", "ConnectError", "HTTP 405", "HTTP 500"):
        assert reason in logged
    assert "output_file_prefix failed" in logged and "/out/" not in logged  # the URL may carry a signature


# -- trusted by the operator: delivered ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.1", "2130706433", "[::1]", "hooks.example"])
async def test_trusted_receivers_get_webhooks_and_uploads(
    tmp_path: Path, receiver: Receiver, names: dict[str, Any], host: str
) -> None:
    if host == "[::1]" and receiver.port6 is None:
        pytest.skip("no IPv6 loopback here")
    names["hooks.example"] = "127.0.0.1"
    async with serve(tmp_path, webhook_allow=["127.0.0.0/8", "::1", "hooks.example"]) as doors:
        replicate = await create(doors, "replicate", webhook=receiver.url(host, "/replicate"), **COMPLETED)
        await settled(doors)
        cog = await create(doors, "cog", webhook=receiver.url(host, "/cog"), **COMPLETED)
        assert replicate.status_code == 201 and cog.status_code == 202
        await settled(doors)
        body = {"input": {"prompt": "x"}, "output_file_prefix": receiver.url(host, "/out/")}
        upload = await doors.client.post("/predictions", json=body)
        await settled(doors)
    name = f"/out/{upload.json()['id']}-0.webp"  # downloads and uploads are named <prediction>-<index>
    assert upload.status_code == 200 and upload.json()["output"] == [receiver.url(host, name)]
    seen = sorted((r.method, r.path) for r in receiver.requests)
    assert seen == [("POST", "/cog"), ("POST", "/replicate"), ("PUT", name)]
    assert {r.headers["Host"] for r in receiver.requests} == {receiver.url(host, "").removeprefix("http://")}


async def test_allowing_private_addresses_still_refuses_metadata(tmp_path: Path, receiver: Receiver) -> None:
    async with serve(tmp_path, webhook_allow_private=True) as doors:
        assert (await create(doors, "cog", webhook=receiver.url("127.1"), **COMPLETED)).status_code == 202
        await settled(doors)
        fields, message = refused("cog", await create(doors, "cog", webhook="http://169.254.169.254/latest/"))
        assert fields == ["body.webhook"] and "a cloud metadata address" in message
        await settled(doors)
    assert [r.path for r in receiver.requests] == ["/hook"]


async def test_fetch_allow_does_not_open_deliveries(tmp_path: Path, receiver: Receiver) -> None:
    """Trusting a host as a source of input images is not trusting it to receive webhooks."""
    async with serve(tmp_path, fetch_allow=["127.0.0.0/8"], fetch_allow_private=True) as doors:
        fields, _ = refused("replicate", await create(doors, "replicate", webhook=receiver.url("127.0.0.1")))
        assert fields == ["webhook"] and receiver.requests == []
