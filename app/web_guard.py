"""What the web page refuses before any image is read: bodies over the limit, names holding a
path, requests without the access token. Starlette/ASGI pieces of ``lungedge serve``."""

from __future__ import annotations

import hmac
from typing import Optional

from lungedge.edge_runtime.errors import ImageError

TOKEN_COOKIE = "lungedge_token"
TOKEN_HEADER = "x-lungedge-token"


class BodyTooLarge(Exception):
    """A request body grew past the limit while it arrived."""


def too_large_text(limit: int) -> str:
    return f"error: upload too large (limit {limit / 2**20:.0f} MiB per request); send fewer or smaller files\n"


class BodyLimit:
    """ASGI middleware: answer 413 when a request body is, or grows, larger than ``limit``."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _declared_too_big(scope, self.limit):
            return await _too_large(scope, receive, send, self.limit)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyTooLarge:
            if not started:
                await _too_large(scope, receive, send, self.limit)


def _declared_too_big(scope, limit: int) -> bool:
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is None:
        return False
    try:
        return int(declared) > limit
    except ValueError:
        return True


async def _too_large(scope, receive, send, limit: int):
    from starlette.responses import PlainTextResponse

    await PlainTextResponse(too_large_text(limit), status_code=413, headers={"connection": "close"})(scope, receive, send)


def check_upload_name(raw: Optional[str]) -> str:
    """The label to show for an upload's file name.

    Raises:
        ImageError: the name holds a path or control characters (it is never used as a path,
            and such a name is a sign of a crafted request).
    """
    name = raw or ""
    if not name:
        return "upload"
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name.split("/") or name.startswith("~"):
        raise ImageError(f"file name holds a path, refused (send the file itself): {name[:120]!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name) or len(name) > 255:
        raise ImageError(f"file name has control characters or is too long, refused: {name[:120]!r}")
    return name


def authorised(request, token: Optional[str], form=None) -> bool:
    """True when no token is set, or the request carries it (header, cookie, query or form field);
    compared in constant time."""
    if not token:
        return True
    given = (request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
             or request.query_params.get("token") or (form.get("token") if form is not None else None) or "")
    return hmac.compare_digest(str(given).encode("utf-8", "replace"), token.encode("utf-8"))


def denied():
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("error: access token missing or wrong (open the address with ?token=...)\n",
                             status_code=403)
