"""``lungedge bench``: latency, memory and accuracy of TFLite models on this device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lungedge.edge_runtime.progress import shown
from lungedge.cli_util import EXIT_FAILED, EXIT_OK, handle_errors, parse_int_list
from lungedge.edge_runtime.bench import BenchSettings
from lungedge.model_options import runtime_option, with_runtime


def _default_out(models) -> str:
    """RUN_DIR/bench when every model sits in one folder (the run folder contract), else ./bench."""
    parents = {str(Path(m).resolve().parent) for m in models}
    if len(parents) == 1:
        parent = Path(parents.pop())
        if parent.is_dir() and os.access(parent, os.W_OK):
            return str(parent / "bench")
    return "bench"


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--images", "-i", multiple=True, type=click.Path(),
              help="Image files or folders for the end-to-end timings (repeatable). "
                   "Default: a synthetic 1024x1024 JPEG.")
@click.option("--threads", "-t", default=",".join(map(str, BenchSettings.default("threads"))), show_default=True,
              help="Comma-separated interpreter thread counts.")
@click.option("--runs", "-n", type=click.IntRange(min=1), default=BenchSettings.default("runs"), show_default=True,
              help="Timed calls per measurement.")
@click.option("--warmup", "-w", type=click.IntRange(min=0), default=BenchSettings.default("warmup"), show_default=True,
              help="Untimed calls before timing.")
@runtime_option("backend")
@click.option("--data", "-d", type=click.Path(file_okay=False), default=None,
              help="Labelled folder DATA/<class>/<image>: also measure accuracy.")
@runtime_option("labels", note="Without it, such a model's classes are named class_0..N-1.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: MODEL_DIR/bench if all models share a folder, else ./bench).")
@click.option("--compare", is_flag=True,
              help="MODELS are bench_report.json files (e.g. from several machines): merge them into one table and chart.")
@click.option("--no-isolate", is_flag=True, help="Run all models in this process (peak RSS is then shared).")
@with_runtime
@handle_errors
def bench_cmd(models, images, threads, runs, warmup, data, runtime, out, compare, no_isolate):
    """Benchmark TFLite models: start-up, first inference, latency percentiles, throughput
    (one image at a time and pipelined), peak RSS, delegate coverage and (with --data) accuracy.

    Writes bench_report.json (schema lungedge.bench/1, raw timings included), bench_report.md
    and bench_report.png; with --data also the trade-off (accuracy, agreement with float32,
    size, latency per variant) in the Markdown and bench_tradeoff.png. The report names the CPU
    features that decide int8 speed (VNNI/AMX on x86, dot product/i8mm on ARM). Each model runs in its own process; a model that fails to load, or
    unreadable images, are reported in the table and the other models still run.

    \b
    Example:
      lungedge bench runs/xray/model_*.tflite --images chest_xray_fullres --threads 1,2 --runs 100
      lungedge bench --compare pi4/bench_report.json laptop/bench_report.json -o compare/

    Exit code 0 if every model ran, 1 if any failed, 2 for a usage error.
    """
    from lungedge.edge_runtime import bench
    from lungedge import bench_report

    if compare:
        paths = bench_report.compare_reports(list(models), out or "bench-compare")
        _echo_paths(paths)
        sys.exit(EXIT_OK)
    thread_list = parse_int_list(threads, "--threads")
    wanted = BenchSettings(images=tuple(images) or None, threads=tuple(thread_list), runs=runs, warmup=warmup,
                           data_dir=data, runtime=runtime)
    report = bench.run_bench(list(models), wanted, isolate=not no_isolate, progress=shown())
    paths = bench_report.write_report(report, out or _default_out(models))
    click.echo(bench_report.format_markdown(report))
    _echo_paths(paths)
    failed = [m for m in report["models"] if m["status"] != "ok"]
    for m in failed:
        click.echo(f"error: {m['name']}: {m['error']}", err=True)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _echo_paths(paths: dict) -> None:
    click.echo("wrote " + ", ".join(paths[k] for k in ("json", "md", "png", "tradeoff_png") if paths.get(k)))
    if paths.get("png_skipped"):
        click.echo(paths["png_skipped"], err=True)

