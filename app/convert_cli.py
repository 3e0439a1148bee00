"""``lungedge convert``: a training run to TFLite variants plus a quantisation report.

TensorFlow is imported only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lungedge.cli_util import EXIT_FAILED, EXIT_OK, handle_errors

from lungedge.convert.settings import ConvertSettings
from lungedge.settings_options import settings_option


def _option(name: str, *decls: str, **kwargs):
    return settings_option(ConvertSettings, name, *decls, **kwargs)


@click.command("convert")
@click.argument("run_dir", type=click.Path())
@_option("variants", "--variants")
@_option("data_dir", "--data", type=click.Path())
@_option("calibration_count", "--calibration", type=int)
@_option("calibration_dir", "--calibration-dir", type=click.Path())
@_option("max_accuracy_drop", "--max-accuracy-drop", type=float)
@_option("max_recall_drop", "--max-recall-drop", type=float)
@_option("rethreshold", "--rethreshold", is_flag=True)
@_option("bias_correction", "--no-bias-correction", is_flag=True, flag_value=False, default=True)
@_option("heatmap", "--heatmap", is_flag=True)
@_option("domain", "--no-domain", is_flag=True, flag_value=False, default=True)
@_option("ood_dir", "--ood", type=click.Path(file_okay=False))
@click.option("--no-gate", is_flag=True, help="Exit 0 even when a variant fails the gate (still reported).")
@_option("out_dir", "--out", type=click.Path(file_okay=False))
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal, unless -q).")
@handle_errors
def convert_cmd(run_dir, no_gate, progress, **fields):
    """Convert a training run to TFLite variants and compare them with the Keras model.

    Writes RUN_DIR/model_<variant>.tflite (labels, preprocessing and threshold inside) and
    quantization_report.{json,md,png}: size, accuracy, per-class recall, macro F1 and
    agreement of each variant with the Keras model on the same test images.

    \b
    Example:
      lungedge convert runs/xray --variants float32,float16,int8
      lungedge convert runs/ct --variants int8 --data ct_test/ --calibration 500

    The gate (convert/quant_gate.py, the same rule as the pipeline's): a variant fails when it did
    not learn (accuracy not above the majority-class rate, binomial p < 0.01), falls more than
    --max-accuracy-drop points below the Keras model, or its disease-class recall more than
    --max-recall-drop. Exit code 1 unless every float variant and at least one integer variant
    pass (--no-gate: report only), or when the Keras model itself did not learn.
    """
    from lungedge.convert.conversion import convert_run

    if progress is not None:
        from lungedge.verbosity import show_progress

        show_progress(progress)
    report = convert_run(run_dir, ConvertSettings(**fields))
    _print_table(report)
    _print_domain(report)
    for v in report["variants"]:
        click.echo(_micro_line(v)) if v.get("micro") else None
    if report.get("domain_gate") not in (None, "fitted"):
        click.echo(f"domain gate: {report['domain_gate']}")
    click.echo(f"report: {report['files']['md']}")
    message = (report.get("verdict") or {}).get("message", "")
    if not report["passed"]:
        click.echo("gate: FAILED" + (f": {message.removeprefix('FAILED').lstrip(': ')}" if message else "")
                   + (" (ignored: --no-gate)" if no_gate else ""), err=True)
        sys.exit(EXIT_OK if no_gate else EXIT_FAILED)
    click.echo(f"gate: {message}" if message else "gate: passed")
    sys.exit(EXIT_OK)


def _print_table(report: dict) -> None:
    """The test set, then one row per model: size, accuracy, agreement with Keras, the gate."""
    k = report["keras"]
    click.echo(f"test images: {report['test']['n']} ({report['test']['note']})")
    click.echo(f"{'model':<16}{'bytes':>11}{'xf32':>7}{'acc %':>8}{'Δ pts':>7}{'agree %':>9}{'max|Δp|':>9}{'conv s':>8}  gate")
    click.echo(f"{'keras':<16}{'-':>11}{'-':>7}{100 * k['accuracy']:>8.2f}{'-':>7}{'-':>9}{'-':>9}{'-':>8}  -")
    for v in report["variants"]:
        ratio = f"{v['size_ratio']:.3f}" if v["size_ratio"] is not None else "-"
        click.echo(f"{v['variant']:<16}{v['size_bytes']:>11}{ratio:>7}{100 * v['accuracy']:>8.2f}"
                   f"{0.0 - v['accuracy_drop_pts']:>+7.2f}{100 * v['top1_agreement']:>9.2f}{v['max_prob_diff']:>9.4f}"
                   f"{v['conversion_seconds']:>8.1f}  {v['gate']}"
                   + (f" ({'; '.join(v['gate_reasons'])})" if v["gate_reasons"] else ""))


def _print_domain(report: dict) -> None:
    """Each file's domain gate: its threshold and what it refused (a warning on stderr when its note has one)."""
    for v in report["variants"]:
        d = v.get("domain") or {}
        if d.get("gate") != "on":
            continue
        dev = ", ".join(f"{k} {100 * r['refused']:.0f} %" for k, r in (d.get("dev_sets") or {}).items()
                        if r.get("refused") is not None)
        acc = d.get("accepted") or {}
        click.echo(f"domain {v['variant']}: threshold {d['threshold']:.4g}; refused: validation "
                   f"{100 * (d.get('validation_refused') or 0):.1f} %, test {100 * d['test_refused']:.1f} % "
                   f"({d['test_refused_n']}), {dev}"
                   + (f"; accuracy on the accepted {100 * acc['accuracy']:.2f} %" if acc else ""))
        if "WARNING" in d.get("note", ""):
            click.echo(f"warning: {v['variant']}: {d['note']}", err=True)


def _micro_line(v: dict) -> str:
    """The microcontroller file's verification in one line (``convert.micro``)."""
    m = v["micro"]
    if "error" in m:
        return f"micro {v['variant']}: FAILED in TensorFlow Lite Micro: {m['error']}"
    c, a, t = m["comparison"], m["arena"], m.get("tflm_metrics") or {}
    agree = ", ".join(f"{k} {100 * x:.1f} %" for k, x in c["agreement_with_xnnpack"].items() if x is not None)
    steps = "; ".join(f"{setup} " + ", ".join(f"{o} {n}" for o, n in per.items()) for setup, per in c["max_steps"].items())
    return (f"micro {v['variant']}: {m['model_bytes'] / 1024:.0f} KiB model, TFLM arena {a['measured_total'] / 1024:.0f} KiB "
            f"({a['header_bytes'] / 1024:.0f} KiB in the header), {len(m['operators'])} operators; in TFLM on "
            f"{c['images']} test images: accuracy {100 * t.get('accuracy', float('nan')):.2f} %, largest step "
            f"difference from LiteRT ({steps}), decisions agree with LiteRT's {agree}; C sources: "
            f"{Path(v['file']).parent / 'micro'}")
