"""Sending to a URL a caller gave us (webhooks, Cog's ``output_file_prefix``) without becoming a way into the
server's own network. The guard is the one input images are fetched through (``atelier.fetch``): one mechanism.

Who may be reached
    Public addresses only, in every spelling (``127.1``, ``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``,
    a name that resolves to loopback...): loopback, private, link-local, reserved and cloud metadata
    addresses are refused. The operator trusts receivers with ``ATELIER_WEBHOOK_ALLOW`` (hosts and networks;
    ``ATELIER_WEBHOOK_ALLOW_PRIVATE`` for development). It is a list of its own: a webhook receiver on the
    operator's private network is common when self-hosting, and trusting a host to be written to is not
    trusting it as a source of input images (``ATELIER_FETCH_ALLOW``), nor the other way round. Metadata
    addresses stay refused unless a trusted network names them.

Checked where it counts
    ``send`` connects through ``fetch.GuardedBackend``: at delivery time the name is resolved once, every
    address it resolves to is checked, and the connection goes to the checked address, so a name that was
    public when the prediction was created and points at loopback now (DNS rebinding) is refused before a
    packet is sent. Redirects are never followed (a 3xx is an answer like any other) and the body of an
    answer is never read. ``refuse_at_creation`` turns away earlier, with a 4xx naming the field, what is
    refused whatever DNS says: an address literal in any spelling the resolver accepts, or ``localhost``.
    It looks nothing up; a name is judged when it is connected to.

No connection oracle
    ``DeliveryFailed`` says why a delivery failed (refused address, connection refused, timeout) for the
    operator's log; so does the status a receiver answered. Neither reaches the caller: whatever the cause,
    a caller sees one message (``FAILED``), so a webhook or an ``output_file_prefix`` cannot map which hosts
    and ports answer inside the server's network.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from atelier.errors import FieldProblem, InputError
from atelier.fetch import FetchPolicy, GuardedBackend, IPAddress, Refused, core_url, ssl_context, timeouts

if TYPE_CHECKING:
    from atelier.config import Settings

FAILED = "could not be delivered"  # all a caller learns of a failed delivery, whatever the cause
ALLOW_HINT = "only public addresses are sent to unless the server trusts the host (ATELIER_WEBHOOK_ALLOW)"


class DeliveryFailed(Exception):
    """Why a delivery got no answer: for the operator's log, never for the caller (see the module docstring)."""


def delivery_policy(settings: Settings, *, timeout: float, connect_timeout: float | None = None) -> FetchPolicy:
    """Where deliveries may go (``ATELIER_WEBHOOK_ALLOW``), and how long one may take in all."""
    return FetchPolicy.from_allow(
        settings.webhook_allow,
        allow_private=settings.webhook_allow_private,
        timeout=timeout,
        connect_timeout=min(connect_timeout or timeout, timeout),
        read_timeout=timeout,
        max_redirects=0,
    )


def send(
    method: str,
    url: str,
    policy: FetchPolicy,
    *,
    content: bytes | None = None,
    files: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """One request to ``url`` through the guard (blocking; run it in a thread); the status it was answered.

    Raises ``DeliveryFailed`` when nothing answered: a refused address, a bad URL, a connection or protocol
    error, or the end of ``policy.timeout``.
    """
    try:
        request = httpx.Request(method, url, content=content, files=files, headers=headers)
    except httpx.InvalidURL as exc:
        raise DeliveryFailed(f"not a valid URL ({exc})") from None
    if request.url.scheme not in ("http", "https") or not request.url.host:
        raise DeliveryFailed("not an absolute http(s) URL")
    core = httpcore.Request(
        method, core_url(request.url), headers=request.headers.raw, content=request.read(), extensions=timeouts(policy)
    )
    deadline = policy.clock() + policy.timeout
    pool = httpcore.ConnectionPool(ssl_context=ssl_context(), network_backend=GuardedBackend(policy, deadline))
    try:
        with pool:
            response = pool.handle_request(core)
            response.close()  # the answer's body is never read
            return response.status
    except Refused as exc:
        raise DeliveryFailed(f"{exc}; {ALLOW_HINT}") from None
    except httpcore.TimeoutException as exc:
        raise DeliveryFailed(f"no answer within {policy.timeout:g} s ({type(exc).__name__})") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None


def refuse_at_creation(url: str, field: str, policy: FetchPolicy) -> None:
    """An ``InputError`` on ``field`` when ``url`` is not an absolute http(s) URL, or its host is refused
    whatever DNS says (an address literal, ``localhost``). Names are left to ``send``."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _problem(field, f"got {_show(url)}, which is not a valid URL ({exc})", "format") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _problem(field, f"got {_show(url)}; give an absolute http(s) URL", "format")
    address = literal_address(parsed.host)
    refusal = policy.refusal(parsed.host, address) if address is not None else None
    if refusal is not None:
        raise _problem(field, f"got {_show(url)}, whose host is {refusal[0]}; {ALLOW_HINT}", "forbidden_address")


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` stands for without a lookup, or None for a name to resolve.

    Every spelling the resolver reads as an address counts: IPv6 (a zone stripped), and IPv4 as
    ``inet_aton`` reads it (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``). ``localhost`` and
    its subdomains are loopback (RFC 6761).
    """
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    if not name.isascii():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def _problem(field: str, message: str, kind: str) -> InputError:
    return InputError(FieldProblem(field, message, kind))


def _show(url: str) -> str:
    return repr(url) if len(url) <= 80 else repr(url[:77] + "...")
