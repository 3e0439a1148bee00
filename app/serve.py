"""``lungedge serve``: a local web page to classify images and DICOM files without a terminal.

Starlette (ASGI) under uvicorn, both pure Python, with python-multipart for uploads: the
``serve`` extra, beside ``edge`` (no TensorFlow). One Classifier is built at start and shared
(on ``app.state``); inference runs one image at a time in a worker thread (the interpreter is
not thread-safe) while the event loop keeps accepting uploads.

Safety, by design (the limits live in ``ServeSettings``):
- binds 127.0.0.1 unless ``--host`` says otherwise; an optional access token (``--token``)
  is checked on every request (header ``X-Lungedge-Token``, a cookie set by opening
  ``/?token=...`` once, or the form's hidden field), compared in constant time;
- request bodies above ``max_request_bytes`` are refused while they arrive (413), at most
  ``max_files`` files per request and ``max_upload_bytes`` per file;
- uploads are spooled by the multipart parser into a private temporary folder made at start
  (mode 0700) and removed at exit; nothing else is written (but the audit log when asked for);
  results (CSV) are kept in memory, the last ``keep_results`` only;
- an upload's file name is only ever a label (escaped in HTML, neutralised in CSV); a name that
  holds a path (``/``, ``\\``, ``..``) or control characters is refused for that file;
- every bad file gets its own one-line error and the others are still classified.
"""

from __future__ import annotations

import collections
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional

from lungedge.web_guard import TOKEN_COOKIE, BodyLimit, authorised, check_upload_name, denied  # noqa: F401 (check_upload_name: API)


@dataclass(frozen=True)
class ServeSettings:
    """The web page's limits and access token, held once."""

    token: Optional[str] = None
    #: largest request body (all files of one upload together)
    max_request_bytes: int = 128 * 2**20
    #: largest single file
    max_upload_bytes: int = 64 * 2**20
    #: files per request
    max_files: int = 64
    #: finished result sets kept for CSV download (oldest dropped first)
    keep_results: int = 64
    #: open connections at once; more are answered 503 by uvicorn
    max_connections: int = 400
    #: uploads read into memory and classified at once (the rest wait, spooled to the temp folder)
    in_flight: int = 2
    #: bytes of each uploaded file the multipart parser keeps in memory before spooling to disk
    spool_bytes: int = 64 * 1024
    #: TLS certificate and key (PEM); both or neither
    certfile: Optional[str] = None
    keyfile: Optional[str] = None

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_transport(host: str, settings: ServeSettings, insecure: bool = False) -> None:
    """Refuse to send the access token over plain HTTP to a network beyond this machine.

    Raises:
        ConfigError: a token, no TLS, a host beyond localhost and no ``insecure``.
    """
    from lungedge.edge_runtime.errors import ConfigError

    if bool(settings.certfile) != bool(settings.keyfile):
        raise ConfigError("give --certfile and --keyfile together (or --self-signed DIR)")
    if settings.token and not settings.certfile and host not in LOOPBACK and not insecure:
        raise ConfigError(f"--token over plain HTTP on {host} would cross the network readable by anyone on it: "
                          "give --certfile/--keyfile or --self-signed DIR (or --insecure to accept that)")


class ResultStore:
    """The last ``keep`` CSV result sets, by random key."""

    def __init__(self, keep: int):
        self.keep = keep
        self._texts: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str) -> str:
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._texts[key] = text
            while len(self._texts) > self.keep:
                self._texts.popitem(last=False)
        return key

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            return self._texts.get(key)


async def index(request):
    from starlette.responses import HTMLResponse, RedirectResponse

    from lungedge.results_report import facts_html
    from lungedge.web_pages import page, upload_form

    state = request.app.state
    token = state.settings.token
    if not authorised(request, token):
        return denied()
    if token and request.query_params.get("token"):
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
    body, script = (upload_form(state.settings) + facts_html(state.facts)), ""
    if state.worklist is not None:
        from lungedge.web_worklist import section

        listed, script = section(state)
        body += listed
    return HTMLResponse(page(body, script=script))


def _csv_href(state, entries) -> str:
    from lungedge.results_report import csv_rows, csv_text

    return f"/results/{state.results.remember(csv_text(csv_rows(entries, state.facts)))}.csv"


async def classify_page(request):
    from starlette.responses import HTMLResponse

    from lungedge.results_report import facts_html, results_table, summary_counts
    from lungedge.web_pages import page, summary_html
    from lungedge.web_upload import run_uploads

    entries = await run_uploads(request)
    if not isinstance(entries, list):
        return entries
    state = request.app.state
    body = (summary_html(summary_counts(entries), _csv_href(state, entries)) + facts_html(state.facts)
            + results_table(entries, state.facts))
    return HTMLResponse(page(body, "lungedge results"))


async def classify_api(request):
    from starlette.responses import JSONResponse

    from lungedge.web_pages import api_answer
    from lungedge.web_upload import run_uploads

    entries = await run_uploads(request)
    if not isinstance(entries, list):
        return entries
    state = request.app.state
    return JSONResponse(api_answer(entries, state.facts, _csv_href(state, entries)))


async def download(request):
    from starlette.responses import PlainTextResponse

    state = request.app.state
    if not authorised(request, state.settings.token):
        return denied()
    text = state.results.get(request.path_params["key"])
    if text is None:
        return PlainTextResponse("error: no such results (only the last ones are kept)\n", status_code=404)
    return PlainTextResponse(text, media_type="text/csv",
                             headers={"content-disposition": 'attachment; filename="lungedge-results.csv"'})


async def health(request):
    from starlette.responses import JSONResponse

    facts = request.app.state.facts
    return JSONResponse({"ok": True, "model_sha256": facts["sha256"], "variant": facts["variant"],
                         "tensorflow_loaded": "tensorflow" in sys.modules})


ROUTES = (("/", index, ["GET", "HEAD"]), ("/classify", classify_page, ["POST"]),
          ("/api/classify", classify_api, ["POST"]), ("/results/{key}.csv", download, ["GET", "HEAD"]),
          ("/health", health, ["GET", "HEAD"]))


def build_app(clf, token: Optional[str] = None, settings: Optional[ServeSettings] = None, audit=None,
              worklist=None, lock: Optional[threading.Lock] = None):
    """The Starlette application around one Classifier (``token`` is ``settings.token`` given alone).

    With ``worklist`` (the DICOM listener's), the page lists the images received; ``lock`` is
    the one the listener classifies under (the interpreter is shared).
    """
    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from lungedge.results_report import model_facts

    settings = settings or ServeSettings(token=token)
    routes = [Route(path, fn, methods=methods) for path, fn, methods in ROUTES]
    if worklist is not None:
        from lungedge.web_worklist import worklist_rows

        routes.append(Route("/worklist", worklist_rows, methods=["GET"]))
    app = Starlette(routes=routes,
                    middleware=[Middleware(BodyLimit, limit=settings.max_request_bytes)])
    app.state.clf, app.state.settings, app.state.audit, app.state.worklist = clf, settings, audit, worklist
    app.state.facts = model_facts(clf)
    app.state.lock = lock or threading.Lock()
    app.state.in_flight = anyio.Semaphore(settings.in_flight)
    app.state.results = ResultStore(settings.keep_results)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port).

    Raises:
        ConfigError: the address cannot be bound.
    """
    from lungedge.edge_runtime.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(1024)
    return sock


def serve(clf, host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None, announce=print,
          settings: Optional[ServeSettings] = None, audit=None, worklist=None, lock=None) -> None:
    """Run the server until interrupted. Port 0 picks a free port; the address is announced.

    Raises:
        ConfigError: the address cannot be bound.
    """
    import uvicorn

    settings = settings or ServeSettings(token=token)
    private = tempfile.mkdtemp(prefix="lungedge-serve-")  # 0700: uploads spool here, nowhere else
    tempfile.tempdir = private
    try:
        sock = bind(host, port)
        app = build_app(clf, settings=settings, audit=audit, worklist=worklist, lock=lock)
        config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=settings.max_connections,
                                timeout_keep_alive=5, timeout_graceful_shutdown=3, lifespan="off",
                                ssl_certfile=settings.certfile, ssl_keyfile=settings.keyfile)
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        announce(f"lungedge serve: {settings.scheme}://{shown}:{sock.getsockname()[1]}/"
                 + ("  (token required)" if settings.token else ""))
        sys.stdout.flush()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        tempfile.tempdir = None
        shutil.rmtree(private, ignore_errors=True)
