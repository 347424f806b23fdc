"""The pack's HTTP routes in ComfyUI's server: key status and entry (write-only), offline mode.

Thin glue over structure_api.settings; registered from comfy_entrypoint (before ComfyUI adds its
route table to the app), never at import. Answers hold the key's status, never the key.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from .structure_api import settings
from .structure_api.config import is_loopback_host
from .structure_api.errors import ConfigurationError

log = logging.getLogger("structure_api")

KEY_ROUTE = "/aithriving/key"
MODE_ROUTE = "/aithriving/mode"
# Names this machine is reached by besides its own (a reverse proxy's, a LAN name), comma-separated:
# changes addressed to them are accepted. Read at each request.
ENV_ALLOWED_HOSTS = "AITHRIVING_ALLOWED_HOSTS"
# A host name worth naming back in a refusal; anything else is not repeated.
_PLAIN_HOST = re.compile(r"[a-z0-9.-]{1,253}")
# A key is tens of characters; a body far past that is not a key entry.
MAX_BODY_BYTES = 16 * 1024
# The answer to a change the settings refused; the first class that matches wins (all are
# ConfigurationErrors).
_REFUSAL_STATUS = (
    (settings.KeyRefusedError, 400),
    (settings.KeyFromEnvironmentError, 409),
    (settings.KeyFileLocationError, 409),
    (ConfigurationError, 500),
)


class _RouteError(Exception):
    """A change request this route answers with an error before doing anything."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def cross_origin_refusal(request: web.Request) -> web.Response | None:
    """403 for a change asked by another web page; ComfyUI's own check covers only loopback hosts.

    A browser names the page's origin in Origin (and says cross-site in Sec-Fetch-Site); programs
    on this machine send neither and are let through, as they can read the key file anyway.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != request.host.lower():
            log.warning("refused %s %s from another origin", request.method, request.path)
            return _error(403, "Refused: the request came from another web page than ComfyUI's own.")
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        log.warning("refused %s %s from another site", request.method, request.path)
        return _error(403, "Refused: the request came from another web page than ComfyUI's own.")
    return None


def _listen_addresses() -> list[str]:
    """List the addresses ComfyUI was told to listen on (--listen, comma-separated; 127.0.0.1 by default)."""
    try:
        from comfy.cli_args import args  # ComfyUI's; read at request time, as it was parsed at start

        listen = getattr(args, "listen", None) or "127.0.0.1"
    except ImportError:
        listen = "127.0.0.1"
    return [address.strip().strip("[]").lower() for address in str(listen).split(",") if address.strip()]


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_refusal(request: web.Request) -> web.Response | None:
    """403 for a change sent to a host name that is not this machine's (DNS rebinding).

    A page on another site can make its own name resolve to this machine; the browser then sends
    that name as Host, and the same name as Origin, so the origin check alone lets it through.
    Accepted: localhost, a loopback address, an address ComfyUI listens on (any IP address when it
    listens on all of them: an address, unlike a name, cannot be rebound), and the names the user
    listed in AITHRIVING_ALLOWED_HOSTS. A request without a Host comes from no browser.
    """
    header = request.headers.get("Host")
    if header is None:
        return None
    try:
        name = urlsplit(f"//{header}").hostname or ""
    except ValueError:
        name = ""
    name = name.lower().rstrip(".")
    listening = _listen_addresses()
    if name and (
        is_loopback_host(name)
        or name in listening
        or (_is_address(name) and any(a in _WILDCARD_ADDRESSES for a in listening))
        or name in _allowed_hosts()
    ):
        return None
    log.warning("refused %s %s for another host name", request.method, request.path)
    named = f" {name}" if _PLAIN_HOST.fullmatch(name) else ""
    return _error(
        403,
        f"Refused: the request was addressed to another host name{named} than this machine's "
        "(localhost or the address ComfyUI listens on). If you reach ComfyUI by that name (a "
        f"reverse proxy, a LAN name), add it to {ENV_ALLOWED_HOSTS} and restart ComfyUI.",
    )


def _allowed_hosts() -> set[str]:
    """Return the host names listed in AITHRIVING_ALLOWED_HOSTS, lower-cased, without ports."""
    listed = os.environ.get(ENV_ALLOWED_HOSTS, "")
    names = set()
    for item in listed.split(","):
        try:
            name = urlsplit(f"//{item.strip()}").hostname or ""
        except ValueError:
            continue
        if name:
            names.add(name.lower().rstrip("."))
    return names


_WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


async def _json_body(request: web.Request) -> dict:
    """Read the request's JSON object; raise _RouteError if it is not JSON, too large or not an object."""
    # JSON only: a page elsewhere cannot send this content type without the browser asking first.
    if request.content_type != "application/json":
        raise _RouteError(415, "Send the request as JSON (Content-Type: application/json).")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _RouteError(413, "The request is too large for a key or a setting.")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise _RouteError(413, "The request is too large for a key or a setting.")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _RouteError(400, "The request is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _RouteError(400, "The request must be a JSON object.")
    return body


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _change(handler: Handler) -> Handler:
    """Guard a route that changes a setting: refuse other pages; answer a bad request or a refusal as JSON."""

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.Response:
        for check in (cross_origin_refusal, host_refusal):
            refusal = check(request)
            if refusal is not None:
                return refusal
        try:
            return await handler(request)
        except _RouteError as error:
            return _error(error.status, str(error))
        except ConfigurationError as error:
            status = next(code for kind, code in _REFUSAL_STATUS if isinstance(error, kind))
            return _error(status, str(error))

    return route


def _served_folders() -> list[str]:
    """Every folder ComfyUI serves files from over HTTP, read at request time (so --base-directory counts)."""
    import importlib

    import folder_paths  # ComfyUI's

    folders = [
        getattr(folder_paths, name)()
        for name in (
            "get_input_directory",
            "get_output_directory",
            "get_temp_directory",
            "get_user_directory",
        )
        if hasattr(folder_paths, name)
    ]
    # The custom nodes' web folders (served under /extensions/) and the frontend's own root.
    folders += list(getattr(importlib.import_module("nodes"), "EXTENSION_WEB_DIRS", {}).values())
    from server import PromptServer

    folders.append(getattr(PromptServer.instance, "web_root", None))
    return [str(folder) for folder in folders if folder]


async def get_key(request: web.Request) -> web.Response:
    """GET /aithriving/key: {"set": bool, "source": "environment" | "key file" | null}."""
    return web.json_response(settings.key_status().as_json())


@_change
async def post_key(request: web.Request) -> web.Response:
    """POST /aithriving/key {"key": "..."}: write the key file; answers with the status."""
    body = await _json_body(request)
    if "key" not in body:
        raise _RouteError(400, 'Send the key as {"key": "..."}.')
    status = settings.save_api_key(body["key"], forbidden_dirs=_served_folders())
    return web.json_response(status.as_json())


@_change
async def delete_key(request: web.Request) -> web.Response:
    """DELETE /aithriving/key: remove the key file; answers with the status."""
    return web.json_response(settings.delete_api_key().as_json())


async def get_mode(request: web.Request) -> web.Response:
    """Answer GET /aithriving/mode with {"offline": bool}."""
    return web.json_response({"offline": settings.offline_mode()})


@_change
async def post_mode(request: web.Request) -> web.Response:
    """Switch the offline mode (POST /aithriving/mode {"offline": bool}); kept across restarts."""
    body = await _json_body(request)
    # {"local": bool} is the old spelling, accepted for one release.
    value = body.get("offline", body.get("local"))
    if not isinstance(value, bool):
        raise _RouteError(400, 'Send {"offline": true} or {"offline": false}.')
    offline = settings.set_offline_mode(value)
    if not offline:
        # Here, not at the top: the stand-in pulls in the client and the renderer, which only this needs.
        from .structure_api.offline import process_standin

        process_standin().release()
    return web.json_response({"offline": offline})


def register_routes(routes: web.RouteTableDef) -> None:
    """Add the pack's routes to ComfyUI's route table (ComfyUI also serves each under /api); once only."""
    if any(getattr(route, "path", None) == KEY_ROUTE for route in routes):
        return
    routes.get(KEY_ROUTE)(get_key)
    routes.post(KEY_ROUTE)(post_key)
    routes.delete(KEY_ROUTE)(delete_key)
    routes.get(MODE_ROUTE)(get_mode)
    routes.post(MODE_ROUTE)(post_mode)
