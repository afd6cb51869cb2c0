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

from aiohttp import web

from service import PRINCIPAL, ROLES, HttpProblem, allow, json_response

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
    """Every file under static/ by its path there; nothing else can be asked for."""
    assets: dict[str, Asset] = {}
    pending = [(resources.files(__name__) / "static", "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                pending.append((entry, f"{name}/"))
            elif "." + name.rsplit(".", 1)[-1] in _CONTENT_TYPES:
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                assets[name] = Asset(body, _CONTENT_TYPES["." + name.rsplit(".", 1)[-1]], etag)
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


@allow(frozenset(ROLES))
async def current_key(request: web.Request) -> web.StreamResponse:
    """Which key this is and its role: the console shows what the role may read."""
    principal = request[PRINCIPAL]
    return json_response({"key_id": principal.key_id, "name": principal.name, "role": principal.role})


# Assets before the catch-all page route: the router tries routes in this order.
ROUTES = [
    ("GET", "/v1/api-keys/me", current_key),
    ("GET", "/console/assets/{name:.+}", console_asset),
    ("GET", "/console", console_page),
    ("GET", "/console/{page:.*}", console_page),
]
