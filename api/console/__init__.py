"""The console (CONTRACT §8): a page for auditors and operators, served by the service itself.

The server sends files only: one HTML shell for ``/console`` and every path
below it (the page reads its own path and draws itself), its ES modules and
style sheet, and the vendored Chart.js. No figure is rendered here: the page
calls the public API with the key its user typed, so these routes take no
key, and a page that shows nothing but what the API answers cannot disagree
with it. The files ship inside the package (pyproject's package data) and are
read once, at import: about 260 KB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import msgspec
from aiohttp import web

from api.auth import PRINCIPAL, ROLES
from api.problems import HttpProblem, json_response
from api.route import Route

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
# The page loads nothing but this service's own files and API: no CDN, no inline script,
# no framing (closed networks; an auditor's key must not leak to another origin).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new release is seen at once
}
SHELL = "index.html"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _load_assets() -> dict[str, Asset]:
    """Every file under static/ (and static/vendor/) by its name; nothing else can be asked for."""
    static = resources.files(__name__) / "static"
    assets: dict[str, Asset] = {}
    for folder in (static, static / "vendor"):
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if entry.is_file() and suffix in _CONTENT_TYPES:
                assert entry.name not in assets, f"two console files named {entry.name}"
                body = entry.read_bytes()
                assets[entry.name] = Asset(body, _CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    assert SHELL in assets, "the console's shell is missing from the package"
    return assets


ASSETS = _load_assets()


def _send(request: web.Request, asset: Asset) -> web.Response:
    headers = {**_HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


async def console_page(request: web.Request) -> web.StreamResponse:
    """The shell, for /console and every page below it (members, liability, …)."""
    return _send(request, ASSETS[SHELL])


async def console_asset(request: web.Request) -> web.StreamResponse:
    asset = ASSETS.get(request.match_info["name"])
    if asset is None:
        raise HttpProblem(404, "not_found", f"the console has no file {request.match_info['name']}")
    return _send(request, asset)


class CurrentKey(msgspec.Struct):
    key_id: str
    name: str
    role: str


async def current_key(request: web.Request) -> web.StreamResponse:
    """Which key this is and its role: the console shows what the role may read (/openapi.json's x-roles)."""
    principal = request[PRINCIPAL]
    return json_response(CurrentKey(principal.key_id, principal.name, principal.role))


# The pages are the shell, whatever the path below /console (CONTRACT §8: `/console/`, `/console/a/b`,
# `/console/members/m-1/` too): the page reads its own path, says when it has no such page, and shows
# the API's refusal of a member id (422 or 404). Only /console/assets/{name} (a single name) is files.
_PATH = {"type": "string"}  # empty or with slashes: {page:.*}
_ANY_NAME = {"type": "string", "minLength": 1}
_PAGE = {"answer_media": None, "errors": (), "parameter_schemas": {"page": _PATH, "member_id": _ANY_NAME}}
ROUTES = [
    Route("GET", "/v1/api-keys/me", current_key, frozenset(ROLES), "The calling key's id, name and role",
          answer=CurrentKey, errors=(401, 429, 503)),
    Route("GET", "/console", console_page, None, "The console (a web page; CONTRACT §8)", **_PAGE),
    Route("GET", "/console/{page:.*}", console_page, None, "A page of the console (any path below /console)", **_PAGE),
    # Served by the route above too; listed for /openapi.json, which names the member page's address.
    Route("GET", "/console/members/{member_id}", console_page, None, "A member's page in the console", **_PAGE),
    Route("GET", "/console/assets/{name}", console_asset, None, "A file of the console (script, style, chart library)",
          answer_media=None, errors=(404,)),
]
