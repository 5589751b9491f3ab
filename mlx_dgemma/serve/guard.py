"""What every request passes before a route sees it: Host, Origin (CORS), API key, body size and encoding.

A server on 127.0.0.1 is still reachable from web pages the user opens: a page
can post to it (an `Origin` header says so), or point its own domain at
127.0.0.1 (DNS rebinding: the `Host` header then names that domain). Both are
refused unless allowed. The body is read here, up to the limit, so that an
oversized or non-UTF-8 body is refused before any parsing.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Iterable, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response, family_of

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
PREFLIGHT_MAX_AGE = "600"
ALLOWED_METHODS = "GET, POST, OPTIONS"
UNAUTHENTICATED_PATHS = ("/health",)


class Guard:
    """ASGI middleware: refuses foreign hosts and origins (403), a missing or wrong API key (401), bodies over
    `max_body_bytes` (413) or not UTF-8 (400); answers CORS preflights for allowed origins."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        allowed_origins: Sequence[str],
        max_body_bytes: int,
        hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.origins = {origin.rstrip("/") for origin in allowed_origins}
        self.max_body_bytes = max_body_bytes
        self.host_names = {*LOOPBACK_NAMES, *(_bare(host) for host in hosts)}
        if any(_bare(host) in WILDCARD_HOSTS for host in hosts):  # every interface: the machine's own names too
            name = socket.gethostname().lower()
            self.host_names |= {name, f"{name}.local"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        family = family_of(scope["path"])
        origin = headers.get("origin")
        if origin is not None and self._origin_allowed(origin):
            send = _with_cors(send, origin)
        refusal = self._host_refusal(scope, headers) or self._origin_refusal(origin)
        if refusal is None and origin is not None and _is_preflight(scope, headers):
            await self._preflight(headers, send)
            return
        refusal = refusal or self._auth_refusal(scope, headers)
        body = b""
        if refusal is None:
            body, refusal = await self._read_body(headers, receive)
            if body is None:
                return  # the client left while sending
        if refusal is not None:
            await error_response(family, refusal)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    # -- the checks ---------------------------------------------------------------------------------------------

    def _host_refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        host = headers.get("host")
        if host is None:
            return None  # HTTP/1.0 clients send none; browsers always do
        name, port = _split_host(host)
        server = scope.get("server")
        names = self.host_names | ({server[0].lower()} if server else set())
        default_port = 443 if scope.get("scheme") == "https" else 80
        if name in names and (server is None or (port or default_port) == server[1]):
            return None
        return ApiError(403, f"Host {host!r} is not this server's (use 127.0.0.1 or localhost)", code="bad_host")

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins

    def _origin_refusal(self, origin: str | None) -> ApiError | None:
        if origin is None or self._origin_allowed(origin):
            return None
        return ApiError(
            403,
            f"requests from web pages at {origin} are not allowed (see dgemma serve --allow-origin)",
            code="origin_not_allowed",
        )

    def _auth_refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        if self.api_key is None or scope["path"] in UNAUTHENTICATED_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key):
            return None
        message = "a missing or wrong API key: send the header 'Authorization: Bearer KEY'"
        return ApiError(401, message, code="invalid_api_key")

    async def _read_body(self, headers: Headers, receive: Receive) -> tuple[bytes | None, ApiError | None]:
        """The whole body, or why it is refused; (None, None) when the client disconnected."""
        too_large = ApiError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            where = f"byte 0x{body[error.start]:02x} at offset {error.start}"
            return body, ApiError(400, f"the request body is not valid UTF-8 ({where})", code="invalid_encoding")
        return body, None

    async def _preflight(self, headers: Headers, send: Send) -> None:
        requested = headers.get("access-control-request-headers", "authorization, content-type")
        response_headers = [
            (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
            (b"access-control-allow-headers", requested.encode("latin-1")),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode()),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": response_headers})
        await send({"type": "http.response.body", "body": b""})


def _bare(host: str) -> str:
    return host.strip().strip("[]").lower()


def _split_host(host: str) -> tuple[str, int | None]:
    """`'[::1]:8080'` -> ('::1', 8080); `'localhost'` -> ('localhost', None); a bad port -> port -1."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    if not port:
        return name.rstrip("."), None
    return name.rstrip("."), int(port) if port.isdigit() else -1


def _is_preflight(scope: Scope, headers: Headers) -> bool:
    return scope["method"] == "OPTIONS" and "access-control-request-method" in headers


def _with_cors(send: Send, origin: str) -> Send:
    """`send` adding the CORS headers that let the allowed page read the response."""

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"access-control-allow-origin"]
            headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            message = {**message, "headers": headers}
        await send(message)

    return cors_send


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over the body already read, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
