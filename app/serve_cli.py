"""``lungedge serve``, ``lungedge listen`` and ``lungedge audit``: the web page, the DICOM
listener and the audit log's summary (the ``serve`` and ``dicom`` extras; no TensorFlow)."""

from __future__ import annotations

import click

from lungedge.model_options import model_options, runtime_option
from lungedge.cli_util import EXIT_OK, ResultSink, dumps_strict, escape_text, handle_errors


def _web_options(f):
    """The page's address, token, TLS and audit log, shared by serve and listen."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True,
                     help="Address to listen on. The default is this machine only; 0.0.0.0 opens it to the network."),
        click.option("--token", default=None, envvar="LUNGEDGE_TOKEN",
                     help="Access token the page asks for (or env LUNGEDGE_TOKEN); open the address with ?token=... "
                          "once."),
        click.option("--certfile", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="TLS certificate (PEM): the page is served over https."),
        click.option("--keyfile", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="TLS private key (PEM) of --certfile."),
        click.option("--self-signed", "self_signed", type=click.Path(file_okay=False), default=None,
                     help="Serve over https with a certificate for this machine kept in this folder (made once)."),
        click.option("--insecure", is_flag=True,
                     help="Allow --token over plain HTTP beyond localhost (anyone on the network can read it)."),
        click.option("--audit-log", "audit_log", type=click.Path(dir_okay=False), default=None,
                     help="Append one JSON line per image (time, source, name or SOP Instance UID, model, result)."),
        click.option("--keep-phi", is_flag=True, help="Also write DICOM patient identifiers to --audit-log."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _start(model, host, token, certfile, keyfile, self_signed, insecure, audit_log, keep_phi, build):
    """(classifier, settings, audit log) after the checks every page start makes."""
    from lungedge.audit import open_audit
    from lungedge.serve import LOOPBACK, ServeSettings, check_transport

    _need_serve_extra()
    if self_signed:
        from lungedge.tls import self_signed as make

        certfile, keyfile = make(self_signed)
    settings = ServeSettings(token=token, certfile=certfile, keyfile=keyfile)
    check_transport(host, settings, insecure)
    if host not in LOOPBACK and not token:
        click.echo(f"warning: listening on {host} without --token: anyone on the network can use the page", err=True)
    clf = build()
    return clf, settings, open_audit(audit_log, clf, keep_phi)


def _need_serve_extra() -> None:
    from lungedge.edge_runtime.errors import MissingDependencyError

    try:
        import multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"the web page needs the serve extra (pip install 'lungedge[serve]'): {exc}") from None


def _classifier(model, runtime):
    """The classifier the page (and the listener) use: the model with the command's runtime settings."""
    from lungedge.edge_runtime.classifier import Classifier

    return Classifier(model, runtime)


def _announce(msg: str) -> None:
    click.echo(escape_text(msg))


@click.command()
@click.option("--model", "-m", required=True, help="A .tflite model (with lungedge metadata, or give --labels).")
@model_options
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="TCP port (0: any free port; the address is printed).")
@_web_options
@runtime_option("allow_out_of_domain")
@handle_errors
def serve_cmd(model, runtime, port, host, token, certfile, keyfile, self_signed, insecure, audit_log, keep_phi):
    """A local web page: upload images or DICOM files, see class, probabilities, threshold and
    heat map, download the results as CSV. Needs the `serve` extra (no TensorFlow).

    \b
    Example:
      lungedge serve --model model_int8.tflite              # http://127.0.0.1:8765/
      lungedge serve -m model_int8.tflite --host 0.0.0.0 --self-signed tls/ --token "$(openssl rand -hex 16)"

    Uploads are spooled to a private temporary folder removed at exit; nothing else is written
    (but --audit-log). A token beyond localhost needs https (--certfile/--keyfile or
    --self-signed) unless --insecure. Not a medical device.
    """
    from lungedge.serve import serve as run_server

    clf, settings, audit = _start(model, host, token, certfile, keyfile, self_signed, insecure, audit_log, keep_phi,
                                  lambda: _classifier(model, runtime))
    run_server(clf, host=host, port=port, announce=_announce, settings=settings, audit=audit)


@click.command()
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@handle_errors
def audit_cmd(log, as_json):
    """Summarise an audit log (and its rotated files): counts per class and per day, images
    not classified and why, the model files used.

    \b
    Example:
      lungedge audit /var/lib/lungedge/audit.jsonl
    """
    from lungedge.audit import summarise, summary_lines

    summary = summarise(log)
    sink = ResultSink()
    for line in [dumps_strict(summary, indent=2)] if as_json else summary_lines(summary):
        sink.line(escape_text(line) if not as_json else line)
    sink.close()
    raise SystemExit(EXIT_OK)
