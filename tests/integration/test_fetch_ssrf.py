"""Input image URLs cannot reach the server's own network (SSRF), checked against real servers on 127.0.0.1.

Each server records every request it gets, so "refused" means "never reached", not only "an error came
back". Names other than ``localhost`` come from a fake resolver (``socket.getaddrinfo`` patched), and a
public address is simulated by patching ``socket.create_connection``: a connection to ``PUBLIC`` is
routed to a local server standing in for a public host, and every connection attempt is recorded.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from atelier.errors import InputError
from atelier.fetch import FetchPolicy
from atelier.imaging.inputs import fetch_url, read_reference
from doors import data_uri, refused, serve

PUBLIC = "93.184.215.14"  # a public address; connections to it go to the local stand-in instead
LOCAL = FetchPolicy(allow_private=True)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


# -- servers ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A real HTTP/1.0 server on 127.0.0.1 (and on ::1 when the host has IPv6) that records every request."""

    hits: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    sent: Counter[str] = field(default_factory=Counter)  # body bytes written per route
    clock: DripClock = field(default_factory=lambda: DripClock())  # the fetch's clock, moved by the drip
    port: int = 0
    port6: int | None = None
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def start(self) -> Server:
        handler = _handler(self)
        self._servers.append(ThreadingHTTPServer(("127.0.0.1", 0), handler))
        with contextlib.suppress(OSError):  # no IPv6 loopback here
            self._servers.append(_V6Server(("::1", 0), handler))
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.port = self._servers[0].server_address[1]
        self.port6 = self._servers[1].server_address[1] if len(self._servers) > 1 else None
        return self

    def url(self, path: str = "/img.png", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits.append((self.path, self.headers.get("Host", "")))
            route, _, query = self.path.partition("?")
            ROUTES.get(route, _not_found)(self, server, urllib.parse.parse_qs(query))

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


Route = Callable[[BaseHTTPRequestHandler, Server, dict[str, list[str]]], None]


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def _not_found(handler: BaseHTTPRequestHandler, server: Server, query: dict[str, list[str]]) -> None:
    _reply(handler, 404, b"not here")


def _redirect(handler: BaseHTTPRequestHandler, server: Server, query: dict[str, list[str]]) -> None:
    _reply(handler, 302, b"", Location=query["to"][0])


def _hops(handler: BaseHTTPRequestHandler, server: Server, query: dict[str, list[str]]) -> None:
    left = int(query["n"][0])
    _reply(handler, 302, b"", Location=f"/hops?n={left - 1}" if left else "/img.png")


def _stream(handler: BaseHTTPRequestHandler, server: Server, name: str, head: bytes, fill: bytes) -> None:
    """``head`` then ``fill`` over and over (up to 256 MiB), counting what was written until the client left."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")  # whatever the bytes are: the header is never trusted
    handler.end_headers()
    try:
        handler.wfile.write(head)
        while server.sent[name] < 256 * 1024 * 1024:
            handler.wfile.write(fill)
            server.sent[name] += len(fill)
    except OSError:
        pass  # the client hung up: what a cap should make it do


class DripClock:
    """The clock a fetch from ``/drip`` measures its deadline on: the drip moves it an hour on after its
    first bytes, so the deadline passes in the middle of the drip without the test waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drip(handler: BaseHTTPRequestHandler, server: Server, query: dict[str, list[str]]) -> None:
    """Headers (or, with ?headers, even the status line) a byte at a time, every 50 ms, for a minute; after
    the fifth byte an hour passes on ``server.clock``."""
    data = b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"
    if "headers" not in query:
        handler.wfile.write(data)
        data = PNG + b"\0" * 100_000
    try:
        for byte in data[:1200]:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            server.sent["drip"] += 1
            if server.sent["drip"] == 5:
                server.clock.now += 3600.0
            time.sleep(0.05)  # the server's pace (a slow server), not the test's timing
    except OSError:
        pass


ROUTES: dict[str, Route] = {
    "/img.png": lambda h, s, q: _reply(h, 200, PNG, **{"Content-Type": "image/png"}),
    "/redirect": _redirect,
    "/hops": _hops,
    "/endless": lambda h, s, q: _stream(h, s, "endless", PNG[:16], b"\0" * 65536),
    "/html": lambda h, s, q: _stream(h, s, "html", b"<!doctype html><html><body>", b"<p>hello</p>" * 5000),
    "/gif": lambda h, s, q: _reply(h, 200, b"GIF89a" + b"\0" * 200, **{"Content-Type": "image/png"}),
    "/declared-huge": lambda h, s, q: _reply(h, 200, PNG, **{"Content-Length": str(10**9)}),
    "/drip": _drip,
}


@pytest.fixture(scope="module")
def target() -> Iterator[Server]:
    """The private server an attacker wants to reach: every refused case asserts it was never hit."""
    server = Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def origin() -> Iterator[Server]:
    """The stand-in for a public host (reached through ``PUBLIC``)."""
    server = Server().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh(target: Server, origin: Server) -> None:
    for server in (target, origin):
        server.hits.clear()
        server.sent.clear()


# -- a fake resolver and a fake internet -----------------------------------------------------------------


@dataclass
class Net:
    names: dict[str, list[list[str]]] = field(default_factory=dict)  # name -> successive answers
    lookups: Counter[str] = field(default_factory=Counter)
    connects: list[tuple[str, int]] = field(default_factory=list)  # every connection attempt
    routes: dict[tuple[str, int], int] = field(default_factory=dict)  # (PUBLIC, port) -> local port

    def answer(self, name: str, *answers: list[str]) -> None:
        self.names[name] = list(answers)


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch, origin: Server) -> Net:
    fake = Net()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in fake.names:
            return real_getaddrinfo(host, port, *args, **kwargs)
        fake.lookups[host] += 1
        answers = fake.names[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [_info(a, int(port)) for a in addresses]

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address[0], int(address[1])
        fake.connects.append((host, port))
        if host == PUBLIC:  # the "public host" is the origin stand-in, whatever port was asked for
            return real_connect(("127.0.0.1", fake.routes.get((host, port), origin.port)), *args, **kwargs)
        if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")):
            raise ConnectionRefusedError(f"no route to {host} in this test")  # never the real internet
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return fake


def _info(address: str, port: int) -> tuple[Any, ...]:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


def refusal(url: str, policy: FetchPolicy | None = None) -> str:
    with pytest.raises(InputError) as excinfo:
        fetch_url(url, policy=policy)
    [problem] = excinfo.value.problems
    return problem.message


# -- addresses in every spelling -------------------------------------------------------------------------

SPELLINGS = {
    "dotted": "127.0.0.1",
    "decimal": "2130706433",
    "hex": "0x7f.0.0.1",
    "short": "127.1",
    "octal short": "0177.1",
    "ipv4-mapped": "[::ffff:127.0.0.1]",
    "ipv4-mapped hex": "[::ffff:7f00:1]",
    "localhost": "localhost",
}


@pytest.mark.parametrize("host", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_loopback_in_any_spelling_is_refused_and_never_reached(target: Server, host: str) -> None:
    message = refusal(target.url("/img.png", host))
    assert "resolves to" in message and "127.0.0.1" in message and "a loopback address" in message
    assert "set ATELIER_FETCH_ALLOW to trust a host" in message
    assert target.hits == []


@pytest.mark.parametrize("host", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_each_spelling_does_reach_the_server_once_private_addresses_are_allowed(target: Server, host: str) -> None:
    """The control: the refusals above are not because these URLs lead nowhere."""
    assert fetch_url(target.url("/img.png", host), policy=LOCAL) == PNG
    assert target.hits == [("/img.png", f"{host}:{target.port}")]  # the Host header is the URL's


def test_an_octal_dotted_quad_is_not_a_url_at_all(target: Server) -> None:
    assert "is not a valid URL" in refusal(target.url("/img.png", "0177.0.0.1"), LOCAL)
    assert target.hits == []


def test_ipv6_loopback_is_refused_and_never_reached(target: Server) -> None:
    if target.port6 is None:
        pytest.skip("no IPv6 loopback here")
    url = f"http://[::1]:{target.port6}/img.png"
    assert "resolves to ::1, a loopback address" in refusal(url)
    assert target.hits == []
    assert fetch_url(url, policy=LOCAL) == PNG and len(target.hits) == 1  # the control


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.1.1", "0.0.0.0", "fd12::1", "fe80::1"],
)
def test_a_name_resolving_to_a_private_address_is_refused_without_connecting(net: Net, address: str) -> None:
    net.answer("evil.test", [address])
    message = refusal("http://evil.test/cat.png")
    assert f"resolves to {address}, a" in message and "address" in message
    assert net.connects == []


def test_a_trusted_name_or_network_is_fetched(net: Net, target: Server) -> None:
    net.answer("evil.test", ["127.0.0.1"])
    url = target.url("/img.png", "evil.test")
    assert "a loopback address" in refusal(url)
    assert target.hits == []
    for allow in (["evil.test"], [".test"], ["*.test"], ["127.0.0.0/8"]):
        assert fetch_url(url, policy=FetchPolicy.from_allow(allow)) == PNG
    assert len(target.hits) == 4
    assert "a loopback address" in refusal(url, FetchPolicy.from_allow(["10.0.0.0/8", "other.test"]))


def test_one_private_address_among_public_ones_refuses_the_name(net: Net, target: Server) -> None:
    net.answer("mixed.test", [PUBLIC, "127.0.0.1"])
    assert "resolves to 127.0.0.1, a loopback address" in refusal(target.url("/img.png", "mixed.test"))
    assert net.connects == [] and target.hits == []


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"])
def test_cloud_metadata_is_refused_even_when_private_addresses_are_allowed(net: Net, address: str) -> None:
    net.answer("metadata.test", [address])
    message = refusal("http://metadata.test/latest/meta-data/", LOCAL)
    assert f"resolves to {address}, a cloud metadata address" in message
    assert net.connects == []


# -- DNS rebinding: the address checked is the address connected to ------------------------------------------


def test_a_rebinding_name_is_connected_to_only_at_the_address_that_was_checked(
    net: Net, target: Server, origin: Server
) -> None:
    """Public on the first lookup, loopback on every later one: the fetch looks up once, uses that answer."""
    net.answer("rebind.test", [PUBLIC], ["127.0.0.1"])
    net.routes[(PUBLIC, target.port)] = origin.port
    assert fetch_url(target.url("/img.png", "rebind.test")) == PNG
    assert net.lookups["rebind.test"] == 1
    assert net.connects == [(PUBLIC, target.port)]
    assert origin.hits == [("/img.png", f"rebind.test:{target.port}")]
    assert target.hits == []


def test_a_rebinding_name_is_checked_again_for_every_connection(net: Net, target: Server, origin: Server) -> None:
    """A redirect to the same name opens a new connection (HTTP/1.0): it is looked up and checked anew."""
    net.answer("rebind.test", [PUBLIC], ["127.0.0.1"])
    net.routes[(PUBLIC, target.port)] = origin.port
    message = refusal(target.url("/redirect?to=/img.png", "rebind.test"))
    assert "was redirected to" in message and "resolves to 127.0.0.1, a loopback address" in message
    assert net.connects == [(PUBLIC, target.port)]
    assert [path for path, _ in origin.hits] == ["/redirect?to=/img.png"] and target.hits == []


# -- redirects -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://localhost:{port}/img.png",
        "http://2130706433:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://evil.test:{port}/img.png",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_a_public_url_redirecting_into_private_space_is_not_followed(
    net: Net, target: Server, origin: Server, to: str
) -> None:
    net.answer("public.test", [PUBLIC])
    net.answer("evil.test", ["127.0.0.1"])
    location = to.format(port=target.port)
    message = refusal(f"http://public.test/redirect?to={urllib.parse.quote(location)}")
    assert message.startswith(f"was redirected to {location!r}, which resolves to ")
    assert len(origin.hits) == 1 and target.hits == []
    assert net.connects == [(PUBLIC, 80)]


@pytest.mark.parametrize("to", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:70/"])
def test_a_redirect_to_another_scheme_is_not_followed(net: Net, origin: Server, to: str) -> None:
    net.answer("public.test", [PUBLIC])
    message = refusal(f"http://public.test/redirect?to={urllib.parse.quote(to)}")
    assert "only http and https URLs are fetched" in message
    assert net.connects == [(PUBLIC, 80)]


def test_a_public_url_that_stays_public_is_fetched_through_redirects(net: Net, origin: Server) -> None:
    net.answer("public.test", [PUBLIC])
    assert fetch_url("http://public.test/hops?n=4") == PNG
    assert "redirected more than 5 times" in refusal("http://public.test/hops?n=5")


# -- slow, big, and not images ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_slow_drip_is_cut_off_at_the_total_deadline(target: Server, where: str) -> None:
    """A byte every 50 ms never trips a read timeout; the deadline for the whole download stops it: the
    fetch gives up at its first read after its clock passed the deadline, in the middle of the drip."""
    target.sent["drip"], target.clock.now = 0, 0.0
    policy = FetchPolicy(allow_private=True, timeout=1.0, clock=target.clock)
    message = refusal(target.url("/drip?headers" if where == "headers" else "/drip"), policy)
    assert "could not be fetched within 1 s" in message
    assert 5 <= target.sent["drip"] < 20  # the deadline passed at byte 5; the drip goes on for 1,200


def test_an_oversized_body_is_stopped_while_streaming(target: Server) -> None:
    policy = FetchPolicy(allow_private=True, max_bytes=1024 * 1024)
    assert "is larger than 1.0 MiB; that is the limit" in refusal(target.url("/endless"), policy)
    assert target.sent["endless"] < 32 * 1024 * 1024  # the client hung up long before the 256 MiB end


def test_a_declared_oversized_body_is_refused_before_reading(target: Server) -> None:
    message = refusal(target.url("/declared-huge"), FetchPolicy(allow_private=True, max_bytes=1024 * 1024))
    assert "is 953.7 MiB; the limit is 1.0 MiB" in message


def test_content_is_sniffed_and_the_download_stops_at_the_first_bytes(target: Server) -> None:
    message = refusal(target.url("/html"), LOCAL)  # served as image/png
    assert message.startswith("is not an image (it starts with b'<!doctype ht')")
    assert target.sent["html"] < 32 * 1024 * 1024
    assert "is a GIF image; allowed formats are png, jpeg, webp" in refusal(target.url("/gif"), LOCAL)


# -- through the doors: the field is named, nothing runs, the operator's settings reach the fetcher -------


@pytest.mark.parametrize("door", ["replicate", "cog", "openai"])
async def test_a_door_refuses_a_private_url_naming_the_field(tmp_path: Path, target: Server, door: str) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.send_urls(door, urls=[target.url("/img.png", "localhost")])
        fields, message = refused(door, response)
        assert fields == [
            {"replicate": "input.input_images[0]", "cog": "body.input.input_images.0", "openai": "images[0]"}[door]
        ]
        assert "resolves to 127.0.0.1, a loopback address" in message
        assert target.hits == [] and doors.jobs == 0


async def test_a_mask_by_url_is_fetched_by_the_same_guarded_path(tmp_path: Path, target: Server) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.send_urls(urls=[data_uri(PNG)], mask=target.url("/img.png"))
        fields, message = refused("openai", response)
        assert fields == ["mask"] and "a loopback address" in message
        assert target.hits == [] and doors.jobs == 0


@pytest.mark.parametrize("settings", [{"fetch_allow_private": True}, {"fetch_allow": "127.0.0.0/8"}])
async def test_the_operators_settings_reach_the_fetcher(tmp_path: Path, target: Server, settings: Any) -> None:
    async with serve(tmp_path, **settings) as doors:
        response = await doors.send_urls("replicate", urls=[target.url()])
        assert response.status_code == 201, response.text
        assert target.hits == [("/img.png", f"127.0.0.1:{target.port}")]


def test_a_read_reference_names_the_field(target: Server) -> None:
    with pytest.raises(InputError) as excinfo:
        read_reference(target.url(), field="input_images[3]", allow_paths=False)
    [problem] = excinfo.value.problems
    assert problem.field == "input_images[3]" and problem.received == target.url()
    assert str(problem).startswith("input_images[3]: resolves to 127.0.0.1, a loopback address; only public")
