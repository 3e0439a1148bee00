"""``lungedge listen``: the DICOM listener with its web page (worklist) in one process."""

from __future__ import annotations

import click

from lungedge.model_options import model_options, runtime_option
from lungedge.cli_util import handle_errors
from lungedge.serve_cli import _announce, _classifier, _start, _web_options


@click.command()
@click.option("--model", "-m", required=True, help="A .tflite model (with lungedge metadata, or give --labels).")
@model_options
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True,
              help="DICOM port (0: any free port; printed).")
@click.option("--ae-title", default="LUNGEDGE", show_default=True, help="This listener's AE title.")
@click.option("--allow-ae", multiple=True,
              help="Calling AE titles accepted (repeat; default: any). Others are rejected and logged.")
@click.option("--queue", "queue_size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images waiting to be classified; one more is answered 0xA700 (send again later).")
@click.option("--send-to", default=None, metavar="AE@HOST:PORT",
              help="Send each result back as a DICOM Basic Text SR referencing the image.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port of the web page with the worklist (0: any free port).")
@_web_options
@runtime_option("allow_out_of_domain")
@handle_errors
def listen_cmd(model, runtime, port, ae_title, allow_ae, queue_size, send_to, http_port, host, token, certfile,
               keyfile, self_signed, insecure, audit_log, keep_phi):
    """Receive images from an X-ray machine or PACS (DICOM C-STORE) and classify each on
    arrival; the web page lists them, newest first. Needs the `dicom` and `serve` extras.

    \b
    Example:
      lungedge listen -m model_int8.tflite --host 0.0.0.0 --allow-ae XRAY1 --audit-log audit.jsonl \\
          --self-signed tls/ --token "$(openssl rand -hex 16)"

    Each image is answered success once classified (an out-of-domain refusal is a result),
    0x0122 for a storage class the model is not for, 0xA700 when the queue is full, 0xC000
    when it cannot be decoded. Not a medical device.
    """
    import threading

    from lungedge.listen import Listener
    from lungedge.serve import serve as run_server
    from lungedge.worklist import Worklist

    _need_dicom_extra()
    clf, settings, audit = _start(model, host, token, certfile, keyfile, self_signed, insecure, audit_log, keep_phi,
                                  lambda: _classifier(model, runtime))
    lock, worklist = threading.Lock(), Worklist()
    sender = _sender(send_to, ae_title)
    listener = Listener(clf, lock, ae_title=ae_title, allow_ae=allow_ae, audit=audit, worklist=worklist,
                        queue_size=queue_size, send_to=sender)
    actual = listener.start(host, port)
    _announce(f"lungedge listen: DICOM {ae_title}@{host}:{actual}"
              + (f" (calling AE titles: {', '.join(allow_ae)})" if allow_ae else ""))
    try:
        run_server(clf, host=host, port=http_port, announce=_announce, settings=settings, audit=audit,
                   worklist=worklist, lock=lock)
    finally:
        listener.stop()


def _need_dicom_extra() -> None:
    from lungedge.edge_runtime.errors import MissingDependencyError

    try:
        import pydicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"lungedge listen needs the dicom extra (pip install 'lungedge[dicom]'): "
                                     f"{exc}") from None


def _sender(send_to, ae_title):
    if not send_to:
        return None
    from lungedge.dicom_reply import ResultSender

    return ResultSender.parse(send_to, ae_title)
