"""The ``lungedge`` command line: one click group, each command thin over the library.

Commands that need TensorFlow (train, convert, pipeline, demo) import it only when run, so
``lungedge --help``, ``classify``, ``evaluate`` (of a .tflite) and ``bench`` work on a device
that has only the ``edge`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lungedge import __version__
from lungedge.edge_runtime.progress import shown
from lungedge.cli_util import LazyGroup, EXIT_FAILED, EXIT_OK, ResultSink, dumps_strict, escape_text, handle_errors
from lungedge.model_options import model_options, runtime_option, with_runtime

# Commands defined in other modules, imported only when that command runs (or --help lists them):
# name -> "module:attribute". Their modules import TensorFlow only inside the command.
_LAZY_COMMANDS = {
    "train": "lungedge.train_cli:train_cmd",
    "convert": "lungedge.convert_cli:convert_cmd",
    "bench": "lungedge.bench_cli:bench_cmd",
    "pipeline": "lungedge.pipeline_cli:pipeline_cmd",
    "demo": "lungedge.pipeline_cli:demo_cmd",
    "serve": "lungedge.serve_cli:serve_cmd",
    "listen": "lungedge.listen_cli:listen_cmd",
    "audit": "lungedge.serve_cli:audit_cmd",
}


@click.group(cls=LazyGroup, lazy_commands=_LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lungedge")
@click.option("--verbose", "-v", is_flag=True, help="Also show TensorFlow's own start-up and Keras output.")
@click.option("--quiet", "-q", is_flag=True, help="Only results and errors: no progress.")
def main(verbose: bool, quiet: bool) -> None:
    """lungedge: lung-image classifiers from training to a cheap device.

    \b
    Typical flow:
      lungedge demo                                   # everything, offline, on generated images
      lungedge train --recipe xray-pneumonia --data DIR --out runs/xray
      lungedge convert runs/xray --variants float32,float16,int8
      lungedge classify --model runs/xray/model_int8.tflite IMAGES...
      lungedge bench runs/xray/*.tflite --images DIR
    """
    from lungedge.verbosity import NORMAL, QUIET, VERBOSE, configure

    configure(QUIET if quiet else VERBOSE if verbose else NORMAL)


def _workers_option(f):
    return click.option("--workers", type=click.IntRange(min=0), default=None,
                        help="Threads that decode and preprocess images ahead of the interpreter (default: the "
                             "usable cores, at most 4; 0: one image at a time). Results stay in input order.")(f)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="A .tflite model (with lungedge metadata, or give --labels).")
@model_options
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classes to show per image.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per image (errors too).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the results to this file instead of stdout (all or nothing: a failed write leaves no file).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on for >20 images on a terminal).")
@click.option("--heatmap", "heatmap_dir", type=click.Path(file_okay=False), default=None,
              help="Write each image with the class activation map of its predicted class overlaid (PNG) into this folder.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.html, results.csv and images/ (thumbnails, heat maps) into this folder.")
@click.option("--keep-phi", is_flag=True,
              help="Include DICOM patient identifiers (name, ID, dates...) in --json, the report and --audit-log; off "
                   "by default.")
@click.option("--audit-log", "audit_log", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per image (time, file, model sha256 and variant, result) to this log.")
@_workers_option
@runtime_option("allow_out_of_domain")
@handle_errors
def classify(paths, model, runtime, top_k, as_json, out, progress, heatmap_dir, report_dir, keep_phi, audit_log,
             workers):
    """Classify image files or folders (folders are searched recursively); JPEG, PNG... and DICOM.

    \b
    Example:
      lungedge classify --model model_int8.tflite xrays/ patient7.jpeg
      lungedge classify -m model.tflite --json --top-k 2 scan.png > results.jsonl
      lungedge classify -m model_int8.tflite --heatmap maps/ --report report/ dicom_folder/

    DICOM files (read with the `dicom` extra) are named by file and SOP Instance UID; patient
    identifiers are never printed or written unless --keep-phi.

    Exit code 0 if every image was classified, 1 if the model or any image could not be used
    (each is reported on its own line), 2 if the command line is wrong.
    """
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.image_files import expand_inputs

    clf = Classifier(model, runtime)
    _check_heatmap(clf, heatmap_dir, model)
    from lungedge.audit import open_audit

    audit = open_audit(audit_log, clf, keep_phi)
    sources = [p for p, _ in expand_inputs(paths)]
    if progress is None:
        progress = len(sources) > 20 and shown()
    lines = _ResultLines(clf, ResultSink(out), as_json, top_k, keep_phi, sources)
    drawing = _Drawing(heatmap_dir, report_dir)
    results = clf.classify_many(sources, progress=progress, heatmap=drawing.wanted and clf.has_heatmap,
                                workers=workers)
    for src, res in zip(sources, results):  # one result per source, in order
        res = drawing.add(src, res)
        if audit is not None:
            audit.record_result("classify", src, res)
        lines.add(src, res)
    lines.sink.close()
    if report_dir:
        from lungedge.results_report import model_facts, write_report

        page = write_report(report_dir, drawing.entries, model_facts(clf), keep_phi=keep_phi)
        click.echo(f"report: {escape_text(str(page))}", err=True)
    lines.finish(summary_on_stdout=not out)
    sys.exit(EXIT_FAILED if lines.failed else EXIT_OK)


def _check_heatmap(clf, heatmap_dir, model) -> None:
    """``--heatmap`` needs a file with a heat-map signature."""
    if heatmap_dir and not clf.has_heatmap:
        from lungedge.edge_runtime.errors import ModelError

        raise ModelError(f"--heatmap: the model has no heat map (no 'heatmap' signature: converted by an older "
                         f"lungedge, or its head is not pooling -> Dense layers); convert it again: {model!r}")


class _ResultLines:
    """``classify``'s output: the model line, one line per result (text or JSON), the summary;
    failures as ``error:`` lines on stderr (in JSON on the results stream)."""

    def __init__(self, clf, sink: ResultSink, as_json: bool, top_k: int, keep_phi: bool, sources: list):
        self.sink, self.as_json, self.top_k, self.keep_phi = sink, as_json, top_k, keep_phi
        self.info = clf.describe()
        self.count, self.failed, self.refused = len(sources), 0, 0
        self.width = min(max([len(escape_text(p)) for p in sources] + [4]), 60)
        if not as_json:
            sink.line(_model_line(clf, self.info))

    def add(self, src: str, res) -> None:
        from lungedge.edge_runtime.classifier import Failure, Refusal

        info = self.info
        if isinstance(res, Refusal):  # a result without a class: on the results stream, counted as unusable
            self.failed, self.refused = self.failed + 1, self.refused + 1
            self.sink.line(dumps_strict({**res.to_dict(keep_phi=self.keep_phi), "backend": info["backend"],
                                         "model": info["model"]}) if self.as_json else _refusal_line(res, src, self.width))
        elif isinstance(res, Failure):
            self.failed += 1
            if self.as_json:
                self.sink.line(dumps_strict({**res.to_dict(), "backend": info["backend"]}))
            else:
                click.echo(f"error: {escape_text(res.error)}", err=True)
        else:
            self.sink.line(_json_line(res, info, self.top_k, self.keep_phi) if self.as_json
                           else _text_line(res, src, self.width, self.top_k))

    def finish(self, summary_on_stdout: bool) -> None:
        """The text summary: on stdout after the results when all went well, else on stderr."""
        if self.as_json:
            return
        summary = (f"{self.count - self.failed} classified, {self.failed - self.refused} failed"
                   + (f", {self.refused} refused (out of domain)" if self.refused else ""))
        if self.failed or not summary_on_stdout:
            click.echo(summary, err=True)
        else:
            self.sink.line(summary)
            self.sink.close()


class _Drawing:
    """Heat-map files (``--heatmap``) and the report's entries (``--report``) of ``classify``."""

    def __init__(self, heatmap_dir, report_dir):
        self.heatmap_dir, self.report_dir = heatmap_dir, report_dir
        self.wanted = bool(heatmap_dir or report_dir)
        self.entries: list = []

    def add(self, src: str, res):
        """``res``, or the Failure its drawing became; its report entry recorded."""
        from lungedge.edge_runtime.classifier import Failure

        if not self.wanted:
            return res
        if isinstance(res, Failure):
            self.entries.append(_entry(src, res))
            return res
        return _draw(res, src, len(self.entries), self.heatmap_dir, self.report_dir, self.entries)


def _model_line(clf, info: dict) -> str:
    """The first line of text output: which model, which runtime, which decision rule."""
    th = clf.spec.threshold if clf.use_threshold else None
    return escape_text(
        f"model {Path(clf.model_path).name} ({info['variant'] or 'unknown variant'}, input {info['input_dtype']}"
        f" {clf.spec.preprocessing.height}x{clf.spec.preprocessing.width}) on {clf.backend.describe()},"
        f" threads {clf.threads or 'default'}"
        + (f"; decision: {th.label} if p >= {th.value:.3f}" if th else "; decision: most probable class"))


def _refusal_line(res, src: str, width: int) -> str:
    """A refused image as text: the file, OUT OF DOMAIN, the reason and the score against the threshold."""
    name = escape_text(src)
    name = name if len(name) <= width else "..." + name[-(width - 3):]
    v = res.verdict
    against = (f"  [domain score {v.score:.3g} > threshold {v.threshold:.3g}]" if v.stage == "score"
               else f"  [domain score {v.score:.3g}, threshold {v.threshold:.3g}]" if v.score is not None else "")
    uid = f"  SOP {escape_text(res.dicom.sop_instance_uid)}" if res.dicom is not None else ""
    return f"{name:<{width}}  OUT OF DOMAIN  {escape_text(v.reason or '')}{against}{uid}"


def _json_line(res, info: dict, top_k: int, keep_phi: bool) -> str:
    d = res.to_dict(keep_phi=keep_phi)
    d["top_k"] = [[k, v] for k, v in res.top_k(top_k)]
    d["backend"], d["backend_version"], d["model"] = info["backend"], info["backend_version"], info["model"]
    return dumps_strict(d)


def _text_line(res, src: str, width: int, top_k: int) -> str:
    """One result as text: the file (escaped, shortened from the left), class, top-k, time, SOP UID."""
    shown = "  ".join(f"{escape_text(k)} {v:.3f}" for k, v in res.top_k(top_k))
    name = escape_text(src)
    name = name if len(name) <= width else "..." + name[-(width - 3):]
    uid = f"  SOP {escape_text(res.dicom.sop_instance_uid)}" if res.dicom is not None else ""
    mark = ""
    if res.domain is not None and not res.domain.in_domain:  # --allow-out-of-domain
        mark = f"  (OUT OF DOMAIN, answered anyway: {escape_text(res.domain.reason or '')})"
    return f"{name:<{width}}  {escape_text(res.label):<12}  [{shown}]  {res.total_ms:.1f} ms{uid}{mark}"


def _entry(src, res):
    from lungedge.results_report import Entry

    return Entry(src, res)


def _draw(res, src, index, heatmap_dir, report_dir, entries):
    """Heat-map file and report images for one result; a drawing failure becomes its Failure."""
    from lungedge.edge_runtime.classifier import Failure
    from lungedge.edge_runtime.errors import ImageError
    from lungedge.results_report import THUMB_SIDE, heatmap_file, images_for

    try:
        if heatmap_dir and res.heatmap is not None:
            _, heat = images_for(src, res, max_side=512)
            heatmap_file(heatmap_dir, src, index, heat)
        entry = _entry(src, res)
        if report_dir:
            entry.thumb_png, entry.heatmap_png = images_for(src, res, max_side=THUMB_SIDE)
    except ImageError as exc:
        res = Failure(src, str(exc))
        entry = _entry(src, res)
    entries.append(entry)
    return res


@main.command()
@click.option("--model", "-m", required=True,
              help="A .tflite model, or a training run folder / .keras file (needs TensorFlow).")
@click.option("--data", "-d", required=True, type=click.Path(),
              help="Labelled folder: DATA/<class>/<image>.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics JSON here.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images (quick checks).")
@_workers_option
@handle_errors
def evaluate(model, data, runtime, as_json, out, limit, workers):
    """Accuracy, per-class precision/recall/F1/specificity and the confusion matrix.

    \b
    Example:
      lungedge evaluate --model model_int8.tflite --data chest_xray/test
      lungedge evaluate --model runs/xray --data chest_xray/test   # Keras model of a run

    Works on the device with numpy only for .tflite models; a run folder or .keras file
    is evaluated with TensorFlow. Exit code 1 if the model, the data folder or any image
    could not be used, 2 if the command line is wrong.
    """
    from lungedge.edge_runtime.metrics import format_report

    keras_model = _is_keras_model(model)
    _check_data_folder(data)
    if keras_model:
        from lungedge.train.keras_eval import evaluate_keras

        metrics = evaluate_keras(str(Path(model)), data, limit=limit, use_threshold=runtime.use_threshold)
    else:
        metrics = _evaluate_tflite(model, data, runtime, limit, workers)
    if out:
        sink = ResultSink(out)
        sink.line(dumps_strict(metrics, indent=2))
        sink.close()
    sink = ResultSink()
    if as_json:
        sink.line(dumps_strict(metrics, indent=2))
    else:
        m = metrics.get("model", {})
        sink.line(escape_text(f"model {model} on {m.get('backend', 'keras')} {m.get('backend_version', '')}; "
                              f"decision: {metrics.get('decision', 'argmax')}; data {data}"))
        for ln in format_report(metrics).splitlines():
            sink.line(escape_text(ln))
        for ln in _coverage_lines(metrics.get("domain") or {}):
            sink.line(escape_text(ln))
    sink.close()
    for f in metrics.get("failures", []):
        click.echo(f"error: {escape_text(f['error'])}", err=True)
    refused = (metrics.get("domain") or {}).get("refused", 0)
    sys.exit(EXIT_FAILED if metrics.get("failures") or refused else EXIT_OK)


def _is_keras_model(model: str) -> bool:
    """A run folder or a .keras/.h5 file (evaluated with TensorFlow), else a .tflite file."""
    from lungedge.edge_runtime.errors import ModelError

    p = Path(model)
    if p.is_dir():
        if not (p / "model.keras").is_file():
            raise ModelError(f"not a .tflite file or a training run folder (no model.keras in it): {model!r}")
        return True
    if p.suffix in (".keras", ".h5") and not p.is_file():
        raise ModelError(f"model file not found: {model!r}")
    return p.suffix in (".keras", ".h5")


def _check_data_folder(data: str) -> None:
    from lungedge.edge_runtime.errors import InputError

    if Path(data).is_file():
        raise InputError(f"expected a data folder DIR/<class>/<image>, got a file: {data!r}")
    if not Path(data).is_dir():
        raise InputError(f"data folder not found: {data!r}")


def _evaluate_tflite(model: str, data: str, runtime, limit, workers) -> dict:
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.errors import ConfigError, InputError
    from lungedge.edge_runtime.folder_eval import evaluate_classifier

    clf = Classifier(model, runtime)
    try:
        return evaluate_classifier(clf, data, progress=shown(), limit=limit, workers=workers)
    except ConfigError as exc:  # the data folder does not fit the model: an input, not the command line
        raise InputError(str(exc)) from None


def _coverage_lines(d: dict) -> list:
    """The domain gate's part of ``evaluate``'s text: refused images, coverage, metrics on all."""
    if d.get("gate") != "on":
        return []
    lines = [f"domain gate (threshold {d['threshold']:.4g}): {d['accepted']} accepted, {d['refused']} refused "
             f"(OUT OF DOMAIN); coverage {100 * (d['coverage'] or 0):.1f} %; the metrics above are on the accepted images"]
    allm = d.get("all_images")
    if allm:
        lines.append(f"on all {allm['n'] if 'n' in allm else d['accepted'] + d['refused']} usable images, refused ones "
                     f"included with the class the model would have given: accuracy {100 * allm['accuracy']:.2f} %")
    for r in d.get("refused_images", [])[:20]:
        lines.append(f"  refused: {r['source']}: {r.get('domain_reason', '')}")
    return lines


@main.command()
@click.option("--model", "-m", required=True, type=click.Path(dir_okay=False),
              help="A lungedge .tflite model (its metadata is rewritten into the new file).")
@click.option("--data", "-d", required=True, type=click.Path(),
              help="The site's labelled images: DATA/<class>/<image>, folder names as the model's labels.")
@click.option("--target-recall", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Recall of the disease class the new threshold must reach on these images, e.g. 0.95.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The new .tflite file.")
@click.option("--positive-label", default=None, help="The disease class (default: the model's own).")
@click.option("--temperature/--no-temperature", default=True, show_default=True,
              help="Also fit a temperature (probabilities that match this site's frequencies; ranking unchanged).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Reliability diagram PNG (default: OUT with .reliability.png).")
@click.option("--domain-threshold/--keep-domain-threshold", default=True, show_default=True,
              help="Also re-choose the domain gate's acceptance threshold on these images (the site's own "
                   "scanner is in the model's domain): their split-conformal 99th percentile.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
@runtime_option("threads")
@_workers_option
@with_runtime
@handle_errors
def recalibrate(model, data, target_recall, out, positive_label, temperature, domain_threshold, plot, as_json,
                runtime, workers):
    """Re-choose the decision threshold (and a temperature) on a site's own labelled images.

    \b
    Example:
      lungedge recalibrate --model model_int8.tflite --data site_images --target-recall 0.95 --out site_int8.tflite

    On the device, without TensorFlow. Prints sensitivity and specificity with bootstrap 95 %
    intervals at the old and new thresholds. Refuses when the folder has too few disease images
    to show the target: with n disease images all detected the one-sided 95 % lower bound of the
    recall is 0.05^(1/n), so a target R needs n >= ln(0.05)/ln(R) (59 for 0.95). The new file's
    metadata records the calibration set (count per class, content hash, date) next to the old
    threshold. Unreadable images are listed with error: lines and left out (exit code 1).
    """
    from lungedge.edge_runtime.recalibration import format_recalibration, recalibrate_file

    plot = plot or str(Path(out).with_suffix("")) + ".reliability.png"
    done = recalibrate_file(model, data, target_recall, out, positive_label=positive_label, temperature=temperature,
                            plot=plot, workers=workers, threads=runtime.threads, progress=shown(),
                            domain_threshold=domain_threshold)
    sink = ResultSink()
    if as_json:
        sink.line(dumps_strict({"out": done.out, "plot": done.plot, "calibration_set": done.calibration_set,
                                **done.result.to_dict(), "failures": list(done.failures),
                                "domain": ({k: v for k, v in done.domain.items() if k != "gate"}
                                           if done.domain else None)}, indent=2))
    else:
        for ln in format_recalibration(done):
            sink.line(escape_text(ln))
    sink.close()
    for f in done.failures:
        click.echo(f"error: {escape_text(f['error'])}", err=True)
    sys.exit(EXIT_FAILED if done.failures else EXIT_OK)


@main.command()
@click.argument("model")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@handle_errors
def inspect(model, runtime, as_json):
    """Show what a .tflite file carries: the lungedge record and the standard TFLite metadata
    (MediaPipe / Task Library), input and output tensors (name, shape, dtype, quantisation),
    the operators with counts and how many a delegate (XNNPACK) took, and whether the file's
    integrity record was verified.

    \b
    Example:
      lungedge inspect model_uint8.tflite
      lungedge inspect --json model_int8.tflite | jq .operators
    """
    from lungedge.edge_runtime.classifier import Classifier

    clf = Classifier(model, runtime)
    info = clf.describe()
    if info["integrity"] == "absent":
        info["integrity_note"] = ("no integrity record: the file was converted before records existed or by "
                                  "another tool, so changes to it cannot be detected")
    info["lungedge_metadata"] = clf.spec.to_dict() if clf.has_metadata else None
    info["metadata"] = info["lungedge_metadata"]  # the name before standard metadata was read
    std_meta = clf.standard
    if std_meta is not None:
        d = std_meta.to_dict()
        d["labels_count"] = len(std_meta.labels) if std_meta.labels is not None else 0
        d["labels"] = list(std_meta.labels[:20]) if std_meta.labels else []
        info["standard_metadata"] = d
    else:
        info["standard_metadata"] = None
    if clf.standard_error:
        info["standard_metadata_error"] = clf.standard_error
    info["preprocessing_used"] = clf.spec.preprocessing.to_dict()
    info["input"], info["output"] = clf.tensor_info("input"), clf.tensor_info("output")
    info["input_quantization"] = list(clf.input_details.get("quantization", ()))
    info["output_quantization"] = list(clf.output_details.get("quantization", ()))
    info["delegate_nodes"] = clf.delegate_nodes()
    info["operators"] = clf.operators()
    info["structure"] = {"subgraphs": clf.structure.subgraphs, "operators": clf.structure.operators,
                         "tensors": clf.structure.tensors, "buffers": clf.structure.buffers}
    sink = ResultSink()
    if as_json:
        sink.line(dumps_strict(info, indent=2, default=str))
    else:
        for line in _inspect_text(info):
            sink.line(escape_text(line))
    sink.close()


def _inspect_text(info: dict) -> list:
    lines = [f"model {info['model']}: {info['size_bytes']:,} bytes, sha256 {info['sha256'][:16]}..., "
             f"integrity {info['integrity']}",
             f"runtime {info['backend']} {info['backend_version']}; labels and preprocessing from "
             f"{info['metadata_source'] or 'the command line'}"]
    if info.get("integrity_note"):
        lines.append(f"  note: {info['integrity_note']}")
    spec = info["lungedge_metadata"]
    lines += _record_text(spec) if spec else ["lungedge record: none"]
    lines += _standard_text(info)
    return lines + _graph_text(info)


def _record_text(spec: dict) -> list:
    """The lungedge record, for ``inspect``: labels, decision, output, recalibration, domain gate."""
    th = spec.get("threshold")
    lines = [f"lungedge record: variant {spec.get('variant')}, recipe {spec.get('recipe')}, "
             f"labels {spec['labels']}, decision "
             + (f"{th['label']} if p >= {th['value']:.4f}" if th else "most probable class")]
    if th:
        lines.append(f"  threshold chosen on {th.get('chosen_on')} (target recall {th.get('target_recall')}, "
                     f"rule {th.get('rule', 'balanced')})")
    lines.append(f"  output {spec.get('output')}, softmax temperature {spec.get('temperature', 1.0):g}")
    recal = (spec.get("extra") or {}).get("recalibration")
    if isinstance(recal, dict):
        cs, before = recal.get("calibration_set", {}), (recal.get("threshold") or {}).get("before")
        lines.append(f"  recalibrated on {cs.get('images')} images {cs.get('per_class')} (sha256 "
                     f"{str(cs.get('sha256'))[:16]}, {cs.get('date')}); threshold before: "
                     + (f"{before['value']:.4f} ({before.get('chosen_on')})" if before else "none"))
    return lines + _domain_text(spec)


def _standard_text(info: dict) -> list:
    """The standard TFLITE_METADATA record, for ``inspect``."""
    sm = info["standard_metadata"]
    if sm:
        inp = sm["inputs"][0] if sm["inputs"] else {}
        out = sm["outputs"][0] if sm["outputs"] else {}
        files = ", ".join(f"{f['name']} ({f['type']})" for f in out.get("files", ())) or "none"
        lines = [f"standard metadata (TFLITE_METADATA): {sm['name']!r} version {sm['version']!r}, "
                 f"parser >= {sm['min_parser_version']}",
                 f"  input {inp.get('name')!r}: colour {inp.get('color_space')}, normalisation mean "
                 f"{inp.get('mean')} std {inp.get('std')}",
                 f"  output {out.get('name')!r}: labels file {files}, {sm['labels_count']} labels",
                 f"  author {sm['author']!r}; licence {sm['license']!r}"]
    else:
        lines = ["standard metadata (TFLITE_METADATA): none"]
    if info.get("standard_metadata_error"):
        lines.append(f"  unreadable: {info['standard_metadata_error']}")
    return lines


def _graph_text(info: dict) -> list:
    """Preprocessing, tensors and operators, for ``inspect``."""
    from lungedge.edge_runtime.spec import Preprocessing

    def tensor(t):
        q = t["quantization"]
        qs = f"scale {q['scale']:.7g} zero point {q['zero_point']}" if q else "not quantised"
        return f"{t['name']}  {t['shape']}  {t['dtype']}  {qs}"

    p = info["preprocessing_used"]
    contrast = Preprocessing.from_dict(p).contrast_text
    clahe = f"{contrast}, " if contrast else ""
    lines = [f"preprocessing used: {p['height']}x{p['width']} {p['color_mode']}, {p['resize']}, {clahe}"
             f"(pixel - {p['mean']}) / {p['std']}",
             f"input   {tensor(info['input'])}", f"output  {tensor(info['output'])}"]
    ops = info["operators"]
    total, delegated = sum(r["count"] for r in ops), sum(r["delegated"] for r in ops)
    lines.append(f"operators: {total} nodes, {delegated} delegated ({info['delegate_nodes']} delegate "
                 f"partition(s)); the rest run on {info['backend']}'s own kernels")
    return lines + [f"  {r['op']:<22} {r['count']:>4}  ({r['delegated']} delegated)" for r in ops]


if __name__ == "__main__":  # pragma: no cover
    main()


def _domain_text(spec: dict) -> list:
    """What the model is for and its domain gate, for ``inspect``."""
    lines = []
    intended = spec.get("intended") or {}
    if intended:
        lines.append("  intended for: " + "; ".join(f"{k} {v}" for k, v in intended.items() if v))
    gate = spec.get("domain")
    if gate:
        refusal = ", ".join(f"{k} {100 * v:.1f} %" for k, v in (gate.get("refusal") or {}).items()
                            if isinstance(v, (int, float)))
        lines.append(f"  domain gate: {gate['method']} v{gate['version']} on {gate['layer']} ({gate['dimension']} "
                     f"values); refuses above {gate['threshold']:.4g} (chosen on {gate['chosen_on']})")
        if refusal:
            lines.append(f"  measured refusal: {refusal}")
    else:
        lines.append("  domain gate: none (this file answers every image; convert it again to add one)")
    return lines
