"""``lungedge serve``: a local web page to classify images and DICOM files without a terminal.

Starlette (ASGI) under uvicorn, both pure Python, with python-multipart for uploads: the
``serve`` extra, beside ``edge`` (no TensorFlow). One Classifier is built at start and shared;
inference runs one image at a time in a worker thread (the interpreter is not thread-safe)
while the event loop keeps accepting uploads.

Safety, by design:
- binds 127.0.0.1 unless ``--host`` says otherwise; an optional access token (``--token``)
  is checked on every request (header ``X-Lungedge-Token``, a cookie set by opening
  ``/?token=...`` once, or the form's hidden field), compared in constant time;
- request bodies above ``MAX_REQUEST_BYTES`` are refused while they arrive (413), at most
  ``MAX_FILES`` files per request and ``MAX_UPLOAD_BYTES`` per file;
- uploads are spooled by the multipart parser into a private temporary folder made at start
  (mode 0700) and removed at exit; nothing else is written; results (CSV) are kept in memory,
  the last ``KEEP_RESULTS`` only;
- an upload's file name is only ever a label (escaped in HTML, neutralised in CSV); a name that
  holds a path (``/``, ``\\``, ``..``) or control characters is refused for that file;
- every bad file gets its own one-line error and the others are still classified.
"""

from __future__ import annotations

import collections
import hmac
import html
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from typing import List, Optional

from lungedge.edge_runtime.errors import ImageError, OutputError

#: Largest request body (all files of one upload together).
MAX_REQUEST_BYTES = 128 * 2**20
#: Largest single file.
MAX_UPLOAD_BYTES = 64 * 2**20
#: Files per request.
MAX_FILES = 64
#: Finished result sets kept for CSV download (oldest dropped first).
KEEP_RESULTS = 64
#: Open connections at once; more are answered 503 by uvicorn.
MAX_CONNECTIONS = 400
#: Uploads read into memory and classified at once (the rest wait, spooled to the temp folder).
IN_FLIGHT = 2
#: Bytes of each uploaded file the multipart parser keeps in memory before spooling to disk.
SPOOL_BYTES = 64 * 1024

TOKEN_COOKIE = "lungedge_token"
TOKEN_HEADER = "x-lungedge-token"

ACCEPT = ".jpg,.jpeg,.png,.bmp,.gif,.tif,.tiff,.webp,.pgm,.ppm,.dcm,.dicom,application/dicom,image/*"


class BodyLimit:
    """ASGI middleware: answer 413 when a request body is, or grows, larger than ``limit``."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                return await _too_large(scope, receive, send, self.limit)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(scope, receive, send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope, receive, send, limit: int):
    from starlette.responses import PlainTextResponse

    msg = f"error: upload too large (limit {limit / 2**20:.0f} MiB per request); send fewer or smaller files\n"
    await PlainTextResponse(msg, status_code=413, headers={"connection": "close"})(scope, receive, send)


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


def build_app(clf, token: Optional[str] = None):
    """The Starlette application around one Classifier."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    from lungedge.edge_runtime.classifier import Failure
    from lungedge.reading import (NOT_A_DEVICE, STYLE, Entry, csv_rows, csv_text, facts_html, images_for, model_facts,
                                  results_table, summary_counts)

    import anyio
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = SPOOL_BYTES  # this process serves only this app
    facts = model_facts(clf)
    lock = threading.Lock()
    in_flight = anyio.Semaphore(IN_FLIGHT)
    results: "collections.OrderedDict[str, str]" = collections.OrderedDict()

    def authorised(request: Request, form=None) -> bool:
        if not token:
            return True
        given = (request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
                 or request.query_params.get("token") or (form.get("token") if form is not None else None) or "")
        return hmac.compare_digest(str(given).encode("utf-8", "replace"), token.encode("utf-8"))

    def denied():
        return PlainTextResponse("error: access token missing or wrong (open the address with ?token=...)\n",
                                 status_code=403)

    def page(body: str, title: str = "lungedge") -> str:
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
                f'<body><h1>{html.escape(title)}</h1><p class="notice" id="not-a-device">{html.escape(NOT_A_DEVICE)}</p>'
                f"{body}</body></html>")

    def upload_form() -> str:
        hidden = f'<input type="hidden" name="token" value="{html.escape(token)}">' if token else ""
        return (f'<form id="upload" method="post" action="/classify" enctype="multipart/form-data">{hidden}'
                f'<p><label>Images or DICOM files (up to {MAX_FILES}, {MAX_UPLOAD_BYTES // 2**20} MiB each): '
                f'<input id="files" type="file" name="files" multiple accept="{ACCEPT}"></label></p>'
                f'<p><button id="send" type="submit">Classify</button></p></form>')

    async def index(request: Request):
        if not authorised(request):
            return denied()
        response = HTMLResponse(page(upload_form() + facts_html(facts)))
        if token and request.query_params.get("token"):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    def classify_one(data: bytes, name: str):
        with lock:
            try:
                pred = clf.classify(data, heatmap=clf.has_heatmap, name=name)
            except (ImageError, OutputError) as exc:
                return Entry(name, Failure(name, str(exc)))
        entry = Entry(name, pred)
        try:
            entry.thumb_png, entry.heatmap_png = images_for(data, pred, name=name)
        except ImageError as exc:
            entry.result = Failure(name, str(exc))
        return entry

    async def run_uploads(request: Request):
        """(entries, error response or None)."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException

        try:
            form = await request.form(max_files=MAX_FILES, max_fields=16, max_part_size=64 * 1024)
        except MultiPartException as exc:
            return None, PlainTextResponse(f"error: upload refused ({exc.message})\n", status_code=400)
        except _BodyTooLarge:
            return None, PlainTextResponse(f"error: upload too large (limit {MAX_REQUEST_BYTES / 2**20:.0f} MiB per "
                                           f"request); send fewer or smaller files\n", status_code=413)
        except Exception as exc:  # a malformed body: one line, the server goes on
            return None, PlainTextResponse(f"error: upload could not be read ({type(exc).__name__})\n", status_code=400)
        try:
            if not authorised(request, form):
                return None, denied()
            files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            if not files:
                return None, PlainTextResponse("error: no files in the upload (form field 'files')\n", status_code=400)
            entries: List[Entry] = []
            for f in files:
                try:
                    name = check_upload_name(f.filename)
                except ImageError as exc:
                    entries.append(Entry((f.filename or "")[:120], Failure((f.filename or "")[:120], str(exc))))
                    continue
                async with in_flight:  # bounds the uploads held in memory, whatever the concurrency
                    data = await f.read(MAX_UPLOAD_BYTES + 1)
                    if len(data) > MAX_UPLOAD_BYTES:
                        entries.append(Entry(name, Failure(name, f"file too large (limit {MAX_UPLOAD_BYTES // 2**20} MiB): {name!r}")))
                        continue
                    if not data:
                        entries.append(Entry(name, Failure(name, f"empty file: {name!r}")))
                        continue
                    entries.append(await run_in_threadpool(classify_one, data, name))
                    del data
            return entries, None
        finally:
            await form.close()

    def remember(text: str) -> str:
        key = secrets.token_urlsafe(12)
        results[key] = text
        while len(results) > KEEP_RESULTS:
            results.popitem(last=False)
        return key

    async def classify_page(request: Request):
        entries, error = await run_uploads(request)
        if error is not None:
            return error
        key = remember(csv_text(csv_rows(entries, facts)))
        ok, refused, failed = summary_counts(entries)
        body = (f'<p id="summary">{ok} classified, {failed} failed'
                + (f", {refused} refused (out of domain)" if refused else "") + ". "
                f'<a id="csv" href="/results/{key}.csv">Download the results (CSV)</a> · <a href="/">Classify more</a></p>'
                + facts_html(facts) + results_table(entries, facts))
        return HTMLResponse(page(body, "lungedge results"))

    async def classify_api(request: Request):
        entries, error = await run_uploads(request)
        if error is not None:
            return error
        out = []
        for e in entries:
            r = e.result
            if hasattr(r, "probabilities"):
                d = {"file": e.name, "label": r.label, "probabilities": r.probabilities,
                     "heatmap": e.heatmap_png is not None}
                if r.domain is not None:
                    d.update(r.domain.to_dict())
                if r.dicom is not None:
                    d["sop_instance_uid"] = r.dicom.sop_instance_uid
            elif getattr(r, "verdict", None) is not None:  # refused: no class
                d = {"file": e.name, **r.verdict.to_dict()}
                if r.dicom is not None:
                    d["sop_instance_uid"] = r.dicom.sop_instance_uid
            else:
                d = {"file": e.name, "error": r.error}
            out.append(d)
        key = remember(csv_text(csv_rows(entries, facts)))
        return JSONResponse({"results": out, "csv": f"/results/{key}.csv",
                             "threshold": ({"label": facts["threshold_label"], "value": float(facts["threshold"])}
                                           if facts["threshold"] else None),
                             "model": {"sha256": facts["sha256"], "variant": facts["variant"]}})

    async def download(request: Request):
        if not authorised(request):
            return denied()
        key = request.path_params["key"]
        if key not in results:
            return PlainTextResponse("error: no such results (only the last ones are kept)\n", status_code=404)
        return PlainTextResponse(results[key], media_type="text/csv",
                                 headers={"content-disposition": 'attachment; filename="lungedge-results.csv"'})

    async def health(request: Request):
        return JSONResponse({"ok": True, "model_sha256": facts["sha256"], "variant": facts["variant"],
                             "tensorflow_loaded": "tensorflow" in sys.modules})

    routes = [Route("/", index), Route("/classify", classify_page, methods=["POST"]),
              Route("/api/classify", classify_api, methods=["POST"]),
              Route("/results/{key}.csv", download), Route("/health", health)]
    app = Starlette(routes=routes)
    return BodyLimit(app, MAX_REQUEST_BYTES)


def serve(clf, host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None, announce=print) -> None:
    """Run the server until interrupted. Port 0 picks a free port; the address is announced.

    Raises:
        ConfigError: the address cannot be bound.
    """
    import uvicorn

    from lungedge.edge_runtime.errors import ConfigError

    private = tempfile.mkdtemp(prefix="lungedge-serve-")  # 0700: uploads spool here, nowhere else
    tempfile.tempdir = private
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        sock.listen(1024)
        actual = sock.getsockname()[1]
        app = build_app(clf, token=token)
        config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=MAX_CONNECTIONS,
                                timeout_keep_alive=5, lifespan="off")
        server = uvicorn.Server(config)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        announce(f"lungedge serve: http://{shown}:{actual}/" + ("  (token required)" if token else ""))
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        tempfile.tempdir = None
        shutil.rmtree(private, ignore_errors=True)
