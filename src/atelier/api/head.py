"""``HEAD`` wherever ``GET`` is served: the headers of the ``GET``, no body (RFC 9110 §9.3.2).

FastAPI routes answer only the methods they declare, so ``HEAD /health-check`` was a 405, and uptime
monitors and load balancers that probe with ``HEAD`` (many do by default) saw a server that was down. A
route that declares ``HEAD`` itself (file downloads: no object is read for it) is left alone; any other
``HEAD`` is run as the ``GET`` and its body dropped. The routes are not changed, so the published OpenAPI
documents stay as they are.
"""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or self._declared(scope):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)

    def _declared(self, scope: Scope) -> bool:
        """Whether a route takes ``HEAD`` for this path itself (a mount, such as the static files, does)."""
        return any(route.matches(scope)[0] is Match.FULL for route in self.router.routes)
