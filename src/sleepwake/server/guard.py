"""`Guard`: the checks every request passes before the app sees it.

A pure ASGI middleware, so that nothing is parsed before it has run:

- with a token, every request but the page itself (`GET /`, `/static/...`) and the
  health check (`GET /health`, for probes that hold no secret) must carry
  ``Authorization: Bearer TOKEN``; with API keys ({key: user}, `sleepwake serve --keys`)
  one of the keys instead, and the request is then its key's user's (the app reads
  the user from ``scope["state"][USER_STATE]``);
- without one (the server then listens on a loopback address only), the ``Host`` must
  be a loopback name, so that a web page on another site that rebinds its DNS name to
  127.0.0.1 cannot read the memory;
- a state change (POST, DELETE, ...) from a browser must come from this server's own
  origin, and a body must be JSON: a cross-site form cannot change the memory;
- a body is read whole, at most `max_body` bytes (chunked or not), before the app
  parses it; a larger one is refused with 413.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

USER_STATE = "sleepwake_user"  # the user of the request's API key, in scope["state"]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OPEN_PATHS = ("/", "/health")  # GET without the token; also everything under /static/
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "conflict_error", 500: "server_error"}


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error as OpenAI's API gives it, which its clients know how to show."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    """"localhost", 127.x.x.x or ::1: a name only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    try:
        return urlsplit(f"//{netloc}").hostname or ""
    except ValueError:  # a malformed Host header
        return ""


class Guard:
    """Auth, host, origin and body-size checks in front of `app` (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int, keys: dict[str, str] | None = None) -> None:
        if token and keys:
            raise ValueError("a server has one token or API keys, not both")
        self.app = app
        self.token = token.encode() if token else None
        self.keys = [(k.encode(), u) for k, u in keys.items()] if keys else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        refusal = self._refusal(method, scope["path"], headers, scope)
        if refusal is None and method not in _SAFE_METHODS:
            refusal = self._origin_refusal(headers)
            if refusal is None:
                body, refusal = await self._read_body(headers, receive)
                if body is None:
                    return  # the client went away
                receive = _replay(body, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, method: str, path: str, headers: Headers, scope: Scope) -> JSONResponse | None:
        if self.token is None and self.keys is None:
            if not is_loopback(_host_name(headers.get("host", ""))):
                return error_response(400, "this server answers only to a loopback host name "
                                           "(start it with a token to serve other names)", "invalid_host")
            return None
        if method in ("GET", "HEAD") and (path in _OPEN_PATHS or path.startswith("/static/")):
            return None  # the page asks for the token itself
        scheme, _, given = headers.get("authorization", "").partition(" ")
        secret = given.strip().encode() if scheme.lower() == "bearer" else b""
        if self.keys is not None:
            user = None
            for key, owner in self.keys:  # every key compared, in constant time each
                if hmac.compare_digest(secret, key) and user is None:
                    user = owner
            if user is not None:
                scope.setdefault("state", {})[USER_STATE] = user
                return None
        elif secret and hmac.compare_digest(secret, self.token):
            return None
        why = "missing" if not given else "wrong"
        what = "API key" if self.keys is not None else "token"
        return error_response(401, f"{why} {what}: send 'Authorization: Bearer <{what.split()[-1]}>'",
                              f"{why}_token", {"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _origin_refusal(headers: Headers) -> JSONResponse | None:
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            return error_response(403, f"cross-origin request from {origin} refused", "cross_origin")
        return None

    async def _read_body(self, headers: Headers, receive: Receive) -> tuple[bytes | None, JSONResponse | None]:
        """The whole body, or the refusal when it is too large or not JSON."""
        too_large = error_response(413, f"request body larger than {self.max_body} bytes", "body_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return b"", too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if body and media_type != "application/json":
            return body, error_response(415, "the request body must be JSON (Content-Type: application/json)",
                                        "unsupported_media_type")
        return body, None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body already read, then the client's later messages
    (a disconnect, which ends a streamed reply)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


MIN_KEY_CHARS = 16


def read_keys(path: str) -> dict[str, str]:
    """API keys and their users from a file: a JSON object {"KEY": "USER", ...}, or lines
    ``KEY USER`` (blank lines and lines starting with '#' skipped). `ValueError` saying
    what is wrong and where, for anything else: no key, a key shorter than
    `MIN_KEY_CHARS` or with spaces, a key given twice, an invalid user name."""
    from sleepwake.errors import InvalidUserError
    from sleepwake.users import check_user

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    pairs: list[tuple[str, Any, str]] = []  # (key, user, where)
    if text.lstrip().startswith("{"):
        try:
            items = json.loads(text, object_pairs_hook=list)  # a list of pairs: keys given twice show
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise ValueError('expected a JSON object {"KEY": "USER", ...}')
        pairs = [(k, u, f"key #{i + 1}") for i, (k, u) in enumerate(items)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"line {n}: expected 'KEY USER' (two words), got {len(parts)} word(s)")
            pairs.append((parts[0], parts[1], f"line {n}"))
    if not pairs:
        raise ValueError('no keys in it: write {"KEY": "USER", ...} or lines "KEY USER"')
    keys: dict[str, str] = {}
    for key, user, where in pairs:
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key) \
                or not key.isprintable():
            raise ValueError(f"{where}: a key must be at least {MIN_KEY_CHARS} printable characters without spaces")
        if key in keys:
            raise ValueError(f"{where}: this key is given twice")
        try:
            keys[key] = check_user(user if isinstance(user, str) else repr(user))
        except InvalidUserError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return keys
