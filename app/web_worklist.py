"""The web page's worklist: images received by ``lungedge listen``, newest first, the same row
as an upload's, new rows appearing without a reload (the page long-polls ``/worklist``)."""

from __future__ import annotations

import time

from lungedge.web_guard import authorised, denied

#: longest a ``/worklist`` request waits for a new image before answering "nothing new"
POLL_S = 10.0
#: how often a waiting request looks for a new image
TICK_S = 0.05

SCRIPT = """<script>
(function(){let seq=%d;const body=document.querySelector('#worklist tbody');
async function poll(){try{const r=await fetch('/worklist?after='+seq,{credentials:'same-origin'});
if(!r.ok)throw new Error(r.status);const j=await r.json();if(j.rows){const t=document.createElement('template');
t.innerHTML=j.rows;body.prepend(...t.content.querySelectorAll('tbody tr'));}seq=j.seq;
document.getElementById('worklist-count').textContent=j.seq;}
catch(e){await new Promise(f=>setTimeout(f,2000));}setTimeout(poll,0);}poll();})();
</script>"""


def rows_html(state, after: int) -> str:
    """The table of the entries received after ``after`` (newest first), or "" when none."""
    from lungedge.results_report import results_table

    items = state.worklist.after(after)
    if not items:
        return ""
    return results_table([e for _, e in items], state.facts, numbers=[n for n, _ in items])


def section(state) -> tuple:
    """(the worklist's HTML, its script) for the index page."""
    seq = state.worklist.seq
    from lungedge.results_report import results_table

    table = rows_html(state, 0) or results_table([], state.facts)
    body = (f'<h2>Received from the DICOM listener (<span id="worklist-count">{seq}</span>), newest first</h2>'
            f'<div id="worklist">{table}</div>')
    return body, SCRIPT % seq


async def worklist_rows(request):
    """``GET /worklist?after=N``: the rows received after N, waiting up to ``POLL_S`` for one."""
    import anyio
    from starlette.responses import JSONResponse, PlainTextResponse

    state = request.app.state
    if not authorised(request, state.settings.token):
        return denied()
    try:
        after = int(request.query_params.get("after", "0"))
    except ValueError:
        return PlainTextResponse("error: after must be a number\n", status_code=400)
    deadline = time.monotonic() + POLL_S
    while state.worklist.seq == after and time.monotonic() < deadline:
        await anyio.sleep(TICK_S)
    return JSONResponse({"seq": state.worklist.seq, "rows": rows_html(state, after)})
