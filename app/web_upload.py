"""Reading an upload: the multipart form within the settings' limits, each file classified in
turn with at most ``in_flight`` files held in memory at once."""

from __future__ import annotations

from lungedge.edge_runtime.errors import ImageError
from lungedge.intake import classify_bytes, failed
from lungedge.results_report import Entry
from lungedge.web_guard import BodyTooLarge, authorised, check_upload_name, denied, too_large_text


async def read_form(request, settings):
    """The parsed form, or an error response. The parser spools each file past ``spool_bytes``
    to the private temporary folder (set on this parser only)."""
    from starlette.datastructures import FormData
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.responses import PlainTextResponse

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return FormData()  # no files: answered as such (after the token check)
    parser = MultiPartParser(request.headers, request.stream(), max_files=settings.max_files, max_fields=16,
                             max_part_size=64 * 1024)
    parser.spool_max_size = settings.spool_bytes
    try:
        return await parser.parse()
    except MultiPartException as exc:
        return PlainTextResponse(f"error: upload refused ({exc.message})\n", status_code=400)
    except BodyTooLarge:
        return PlainTextResponse(too_large_text(settings.max_request_bytes), status_code=413)
    except Exception as exc:  # a malformed body: one line, the server goes on
        return PlainTextResponse(f"error: upload could not be read ({type(exc).__name__})\n", status_code=400)


async def run_uploads(request):
    """The entries of one upload request, or an error response."""
    from starlette.datastructures import FormData, UploadFile
    from starlette.responses import PlainTextResponse

    state = request.app.state
    form = await read_form(request, state.settings)
    if not isinstance(form, FormData):
        return form
    try:
        if not authorised(request, state.settings.token, form):
            return denied()
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            return PlainTextResponse("error: no files in the upload (form field 'files')\n", status_code=400)
        return [await _one_file(state, f) for f in files]
    finally:
        await form.close()


async def _one_file(state, upload) -> Entry:
    from starlette.concurrency import run_in_threadpool

    limit = state.settings.max_upload_bytes
    try:
        name = check_upload_name(upload.filename)
    except ImageError as exc:
        return failed((upload.filename or "")[:120], str(exc))
    async with state.in_flight:  # bounds the uploads held in memory, whatever the concurrency
        data = await upload.read(limit + 1)
        if len(data) > limit:
            return failed(name, f"file too large (limit {limit // 2**20} MiB): {name!r}")
        if not data:
            return failed(name, f"empty file: {name!r}")
        return await run_in_threadpool(classify_bytes, state.clf, state.lock, data, name, state.audit)

