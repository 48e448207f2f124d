"""Fetching a URL a caller gave us without becoming a way into the server's own network (SSRF).

Who may be reached
    Only http and https, and only public addresses: loopback, private (RFC 1918, RFC 6598 shared
    address space, fc00::/7), link-local, multicast, reserved, broadcast and unspecified addresses are
    refused, also when written as IPv6 (``::ffff:127.0.0.1``, ``::127.0.0.1``, ``64:ff9b::/96``,
    ``2002::/16``), and so are cloud metadata endpoints. The operator may trust hosts or networks
    (``ATELIER_FETCH_ALLOW``) or, for development, every non-public address (``ATELIER_FETCH_ALLOW_PRIVATE``);
    metadata stays refused unless an allowed network names it. How the URL spells an address does not
    matter (``2130706433``, ``0x7f.0.0.1``, ``127.1``): what is checked is what the resolver makes of it.

No gap between the check and the connection (DNS rebinding)
    The check lives in the network backend through which httpcore opens every TCP connection
    (``GuardedBackend.connect_tcp``): it resolves the name once, checks every address it got (one bad
    address refuses the name) and connects to those very addresses; nothing resolves the name again.
    TLS (SNI, certificate) and the Host header still use the URL's host name. httpcore is used directly
    because httpx has no public way to give its transport a network backend. Redirects are followed
    here, one hop at a time (at most ``max_redirects``), each hop's connections through the same
    backend. Proxies from the environment are never used: a proxy would resolve the name itself.

Bounded
    Connect and read timeouts per operation, and one deadline for the whole fetch, redirects included:
    every socket operation's timeout is clipped to what is left of it, so a server trickling a byte at a
    time is dropped at the deadline. The size cap is counted while the body streams in (a declared
    Content-Length over it is refused unread), and the first bytes go to the caller's check (the image
    sniffer): a page of HTML is refused after a few bytes, whatever its Content-Type says.

Every refusal is an ``InputError`` on field ``url``; callers re-label it (``input_images[0]``).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpcore
import httpx

from atelier.errors import FieldProblem, InputError
from atelier.setting_parsers import IPNetwork, parse_allow

if TYPE_CHECKING:
    from atelier.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HeadCheck = Callable[[bytes], object]  # raises to refuse what it sees

MAX_BYTES = 50 * 1024 * 1024
HEAD_BYTES = 32  # enough for every magic number the image sniffer knows
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRUST_HINT = "only public addresses are fetched (set ATELIER_FETCH_ALLOW to trust a host)"
METADATA_HINT = "it is never fetched unless ATELIER_FETCH_ALLOW names its network"

# Where cloud instances find their credentials. 168.63.129.16 is a public address, reachable only from
# inside Azure, so it is named here rather than caught by the ranges below.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
    )
)

# Named ranges, for messages; anything else that is not globally routable is "reserved" (is_global).
_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("0.0.0.0/8", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("169.254.0.0/16", "a link-local address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# -- the policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched, and how long and how much. The default is the safe one."""

    hosts: tuple[str, ...] = ()  # trusted host names; ".example.com" also trusts every subdomain
    networks: tuple[IPNetwork, ...] = ()  # trusted networks
    allow_private: bool = False  # development: every non-public address (metadata excepted)
    max_bytes: int = MAX_BYTES
    timeout: float = 30.0  # the whole fetch, redirects included
    connect_timeout: float = 10.0
    read_timeout: float = 10.0  # silence between two reads
    max_redirects: int = 5
    # What the deadline is measured on; tests pass a clock they move instead of waiting.
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def from_allow(cls, entries: Iterable[str], **options: object) -> FetchPolicy:
        hosts, networks = parse_allow(entries)
        return cls(hosts=hosts, networks=networks, **options)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls.from_allow(
            settings.fetch_allow,
            allow_private=settings.fetch_allow_private,
            timeout=settings.fetch_timeout,
            connect_timeout=min(settings.fetch_connect_timeout, settings.fetch_timeout),
        )

    def refusal(self, host: str, address: IPAddress) -> tuple[str, str] | None:
        """``(what the address is, how to allow it)`` when ``host``'s ``address`` may not be reached, else None."""
        inner = embedded_ipv4(address)
        if any(a in net for a in (address, inner) if a is not None for net in self.networks):
            return None
        if address in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
            return "a cloud metadata address", METADATA_HINT
        what = classify(address)
        if what is None or self.allow_private or self.trusts(host):
            return None
        return what, TRUST_HINT

    def trusts(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return any(name == h or (h.startswith(".") and name.endswith(h)) for h in self.hosts)


def classify(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("a loopback address"...), or None for a public one."""
    inner = embedded_ipv4(address)
    if inner is not None:
        what = classify(inner)
        return f"{what} written as IPv6 ({inner})" if what else None
    for network, what in _RANGES:
        if address.version == network.version and address in network:
            return what
    return None if address.is_global else "a reserved address"


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped, compatible, NAT64 or 6to4; else None."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or address in _NAT64:
        return ipaddress.IPv4Address(address.packed[12:])
    return None


# -- connections: resolve once, check, connect to what was checked ----------------------------------------


class Refused(Exception):
    """A connection the policy does not allow; raised before any packet is sent to it."""

    def __init__(self, host: str, address: str, what: str, hint: str) -> None:
        super().__init__(f"{host} resolves to {address}, {what}")
        self.host, self.address, self.what, self.hint = host, address, what, hint


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, connecting only to checked addresses and never past ``deadline``."""

    def __init__(self, policy: FetchPolicy, deadline: float) -> None:
        self.policy = policy
        self.deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        failure: httpcore.ConnectError | None = None
        for address in self.resolve(host, port):
            limit = clip(timeout, self.deadline, httpcore.ConnectTimeout, self.policy.clock)
            try:
                stream = self._inner.connect_tcp(address, port, limit, local_address, socket_options)
            except httpcore.ConnectError as exc:  # try the next checked address, as create_connection would
                failure = exc
                continue
            return DeadlineStream(stream, self.deadline, self.policy.clock)
        raise failure or httpcore.ConnectError(f"{host} has no address to connect to")

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, all checked; one refused address refuses the host."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"the host name {host!r} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for text in addresses:
            refusal = self.policy.refusal(host, ipaddress.ip_address(text.split("%", 1)[0]))
            if refusal is not None:
                raise Refused(host, text, *refusal)
        return addresses


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the fetch's deadline."""

    def __init__(
        self, stream: httpcore.NetworkStream, deadline: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._deadline = deadline
        self._clock = clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, clip(timeout, self._deadline, httpcore.ReadTimeout, self._clock))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, clip(timeout, self._deadline, httpcore.WriteTimeout, self._clock))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        limit = clip(timeout, self._deadline, httpcore.ConnectTimeout, self._clock)
        tls = self._stream.start_tls(ssl_context, server_hostname, limit)
        return DeadlineStream(tls, self._deadline, self._clock)

    def get_extra_info(self, info: str) -> object:
        return self._stream.get_extra_info(info)


def clip(
    timeout: float | None, deadline: float, error: type[Exception], clock: Callable[[], float] = time.monotonic
) -> float:
    left = deadline - clock()
    if left <= 0:
        raise error("the time for the whole download is up")
    return left if timeout is None else min(timeout, left)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


# -- the fetch -------------------------------------------------------------------------------------------


def fetch(url: str, policy: FetchPolicy | None = None, *, check_head: HeadCheck | None = None) -> bytes:
    """GET ``url`` as ``policy`` allows; the body, or an ``InputError`` on field ``url`` saying why not.

    ``check_head`` sees the first bytes of the body (at least ``HEAD_BYTES`` when there are that many)
    and may raise to stop the download.
    """
    policy = policy or FetchPolicy()
    deadline = policy.clock() + policy.timeout
    pool = httpcore.ConnectionPool(ssl_context=ssl_context(), network_backend=GuardedBackend(policy, deadline))
    try:
        with pool:
            return _follow(pool, _parse(url, None), policy, deadline, check_head)
    except httpcore.TimeoutException as exc:
        raise _problem(_timed_out(exc, policy, deadline)) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise _problem(f"could not be fetched ({type(exc).__name__}: {exc})") from None


def _follow(
    pool: httpcore.ConnectionPool, url: httpx.URL, policy: FetchPolicy, deadline: float, check_head: HeadCheck | None
) -> bytes:
    for hop in range(policy.max_redirects + 1):
        try:
            with pool.stream("GET", core_url(url), headers=_headers(url), extensions=timeouts(policy)) as response:
                location = _header(response, b"location") if response.status in REDIRECT_STATUSES else ""
                if not location:
                    if response.status != 200:
                        raise _problem(f"could not be fetched: the server answered {response.status}")
                    return _read(response, policy, deadline, check_head)
        except Refused as exc:
            raise _refused(exc, url if hop else None) from None
        url = _parse(str(url.join(location)), url)
    raise _problem(f"redirected more than {policy.max_redirects} times", "fetch")


def _read(response: httpcore.Response, policy: FetchPolicy, deadline: float, check_head: HeadCheck | None) -> bytes:
    declared = _header(response, b"content-length")
    if declared.isascii() and declared.isdigit() and int(declared) > policy.max_bytes:
        raise _problem(f"is {_mb(int(declared))}; the limit is {_mb(policy.max_bytes)}", "too_large")
    body = bytearray()
    for chunk in response.iter_stream():
        unchecked = len(body) < HEAD_BYTES
        body += chunk
        if len(body) > policy.max_bytes:
            raise _problem(f"is larger than {_mb(policy.max_bytes)}; that is the limit", "too_large")
        if check_head is not None and unchecked and len(body) >= HEAD_BYTES:
            check_head(bytes(body[:HEAD_BYTES]))
        clip(None, deadline, httpcore.ReadTimeout, policy.clock)
    return bytes(body)


def _timed_out(exc: httpcore.TimeoutException, policy: FetchPolicy, deadline: float) -> str:
    if policy.clock() >= deadline:
        return f"could not be fetched within {policy.timeout:g} s"
    if isinstance(exc, httpcore.ConnectTimeout):
        return f"could not be fetched: no connection within {policy.connect_timeout:g} s"
    return f"could not be fetched: the server did not answer within {policy.read_timeout:g} s"


def _parse(url: str, previous: httpx.URL | None) -> httpx.URL:
    """``url`` as httpx reads it: http(s), with a host. ``previous`` is the URL that redirected here."""
    shown = _show(url)
    where = f"was redirected to {shown}, which " if previous is not None else ""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _problem(f"{where}is not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise _problem(f"{where}is not an http(s) URL; only http and https URLs are fetched")
    if not parsed.host:
        raise _problem(f"{where}has no host name")
    return parsed


def _refused(exc: Refused, redirected_to: httpx.URL | None) -> InputError:
    where = f"was redirected to {_show(str(redirected_to))}, which " if redirected_to is not None else ""
    return _problem(f"{where}resolves to {exc.address}, {exc.what}; {exc.hint}", "forbidden_address")


def core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)


def _headers(url: httpx.URL) -> list[tuple[bytes, bytes]]:
    return [
        (b"Host", url.netloc),  # as the URL spells it: [::1]:8080, example.com
        (b"User-Agent", b"atelier"),
        (b"Accept", b"image/png, image/jpeg, image/webp"),
        (b"Accept-Encoding", b"identity"),  # images are compressed already; no decompression bombs
    ]


def timeouts(policy: FetchPolicy) -> dict[str, object]:
    read = policy.read_timeout
    return {"timeout": {"connect": policy.connect_timeout, "read": read, "write": read, "pool": policy.timeout}}


def _header(response: httpcore.Response, name: bytes) -> str:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""


def _problem(message: str, kind: str = "fetch") -> InputError:
    return InputError(FieldProblem("url", message, kind))


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def _show(url: str) -> str:
    return repr(url) if len(url) <= 80 else repr(url[:77] + "...")
