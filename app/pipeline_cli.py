"""``lungedge pipeline`` and ``lungedge demo``: the whole job, end to end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from lungedge.cli_util import EXIT_FAILED, EXIT_OK, handle_errors, parse_int_list
from lungedge.convert.settings import ConvertSettings
from lungedge.pipeline_settings import PipelineSettings
from lungedge.settings_options import settings_option


def _print_result(result, started: float, next_steps: bool) -> None:
    click.echo("")
    for s in result.stages:
        click.echo(f"  {s.name:<10} {s.status:<12} {s.seconds:7.1f} s  {s.message}")
    keras = (result.summary.get("keras") or {}).get("accuracy")
    if keras is not None:
        click.echo(f"  {'keras':<14} test accuracy {keras * 100:6.2f} %")
    for q in result.summary.get("quantization") or []:
        click.echo(f"  {q['variant']:<14} test accuracy {q['accuracy'] * 100:6.2f} % ({q['correct']}/{q['n']})"
                   f"  size x{q.get('size_ratio') or float('nan'):.3f}  gate {q.get('gate')}")
    floor = (result.summary.get("shipped") or {}).get("learning_floor") or \
        (result.summary.get("train_metrics") or {}).get("learning_floor")
    if floor:
        click.echo(f"  {floor['sentence']}")
    click.echo(f"  ship: {result.summary['shipped']['file']}" if result.summary.get("shipped")
               else "  ship: nothing (see the report)")
    click.echo(f"\nreport: {result.index}  (also {result.out_dir / 'index.md'})")
    click.echo(f"total {time.perf_counter() - started:.0f} s")
    if next_steps:
        click.echo("\nNext, on real data (a class-folder tree such as chest_xray/train/{NORMAL,PNEUMONIA}):")
        click.echo("  lungedge train --recipe xray-pneumonia --data chest_xray/train --out runs/xray")
        click.echo("  lungedge convert runs/xray --variants float32,float16,int8,int8-mixed")
        click.echo("  lungedge classify --model runs/xray/model_int8.tflite chest_xray/test/PNEUMONIA")


def _convert_option(name: str, *decls: str, **kwargs):
    return settings_option(ConvertSettings, name, *decls, **kwargs)


def _pipeline_option(name: str, *decls: str, **kwargs):
    return settings_option(PipelineSettings, name, *decls, **kwargs)


@click.command("pipeline")
@click.option("--recipe", "-r", required=True, help="Training recipe name (see `lungedge train --help`).")
@click.option("--data", "-d", required=True, type=click.Path(), help="Class-folder dataset.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Report folder to create.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a recipe field, e.g. --set epochs=5 (repeatable).")
@_convert_option("variants", "--variants")
@_convert_option("data_dir", "--test-data", type=click.Path(file_okay=False))
@_convert_option("calibration_count", "--calibration", type=click.IntRange(min=1))
@_pipeline_option("bench_runs", "--bench-runs", type=click.IntRange(min=1))
@_pipeline_option("bench_threads", "--bench-threads")
@_pipeline_option("gate", "--no-gate", is_flag=True, flag_value=False, default=True)
@_convert_option("heatmap", "--heatmap", is_flag=True)
@_convert_option("calibration_dir", "--calibration-dir", type=click.Path(file_okay=False))
@_convert_option("bias_correction", "--no-bias-correction", is_flag=True, flag_value=False, default=True)
@_pipeline_option("resume", "--resume", is_flag=True)
@handle_errors
def pipeline_cmd(recipe, data, out, overrides, bench_runs, bench_threads, gate, resume, **convert):
    """Train, convert to float32/float16/int8/int8-mixed, gate the quantisation, benchmark,
    classify, and write one report folder with an index (index.html, index.md).

    The gate (the same rule as `lungedge convert`, see convert/README.md) passes when the model
    learned and every float variant and at least one integer variant keep the Keras model's
    accuracy; the first passing integer variant (int8, then int8-float-io, then int8-mixed) is
    the one to ship, and is evaluated on every test image.

    \b
    Example:
      lungedge pipeline --recipe xray-pneumonia --data chest_xray/train --out reports/xray

    A failing stage stops the pipeline (exit code 1) and keeps what earlier stages wrote.
    """
    from lungedge.pipeline import run_pipeline
    from lungedge.train.recipes import apply_overrides, get_recipe

    started = time.perf_counter()
    resolved = apply_overrides(get_recipe(recipe), overrides)
    settings = PipelineSettings(ConvertSettings(**convert), bench_runs=bench_runs, gate=gate, resume=resume,
                                bench_threads=parse_int_list(bench_threads, "--bench-threads"))
    result = run_pipeline(resolved, data, out, settings, title=f"lungedge pipeline: {recipe}")
    _print_result(result, started, next_steps=False)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


@click.command("demo")
@click.option("--out", "-o", default="lungedge-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the generated data and the report.")
@click.option("--images-per-class", type=click.IntRange(min=20), default=None,
              help="Generated images per class (default: 200 with ImageNet weights, 2000 without).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default: the recipe's; early stopping).")
@click.option("--seed", type=int, default=0, show_default=True)
@_pipeline_option("bench_runs", "--bench-runs", type=click.IntRange(min=1))
@handle_errors
def demo_cmd(out, images_per_class, epochs, seed, bench_runs):
    """Run the whole pipeline offline on generated chest-radiograph-like images.

    Uses the MobileNetV2 ImageNet weights when it can find them (or fetch them the standard
    Keras way); otherwise it says so and trains a small MobileNetV2 from scratch. Then it
    converts to float32/float16/int8/int8-mixed, gates the quantisation, benchmarks, evaluates
    the file to ship and prints where the report is.

    \b
    Example:
      lungedge demo --out /tmp/lungedge-demo
    """
    from lungedge.demo import CALIBRATION_COUNT, plan_demo
    from lungedge.pipeline import run_pipeline

    started = time.perf_counter()
    plan = plan_demo(Path(out), images_per_class, epochs, seed)
    settings = PipelineSettings(ConvertSettings(calibration_count=CALIBRATION_COUNT), bench_runs=bench_runs)
    result = run_pipeline(plan.recipe, str(plan.data_dir), str(Path(out) / "report"), settings,
                          title="lungedge demo", notes=plan.notes, facts=plan.facts)
    _print_result(result, started, next_steps=True)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)

