"""``lungedge pipeline`` and ``lungedge demo``: the whole job, end to end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from lungedge.cli_util import EXIT_FAILED, EXIT_OK, handle_errors, parse_int_list


def _print_result(result, started: float, next_steps: bool) -> None:
    click.echo("")
    for s in result.stages:
        click.echo(f"  {s.name:<10} {s.status:<12} {s.seconds:7.1f} s  {s.message}")
    for q in result.summary.get("quantization") or []:
        acc = q.get("accuracy")
        click.echo(f"  {q['variant']:<14} test accuracy {acc * 100 if acc is not None else float('nan'):6.2f} %"
                   f"  size x{q.get('size_ratio') or float('nan'):.3f}  gate {q.get('gate')}")
    if result.summary.get("shippable_integer_variant"):
        click.echo(f"  integer model to ship: model_{result.summary['shippable_integer_variant']}.tflite")
    click.echo(f"\nreport: {result.index}  (also {result.out_dir / 'index.md'})")
    click.echo(f"total {time.perf_counter() - started:.0f} s")
    if next_steps:
        click.echo("\nNext, on real data (a class-folder tree such as chest_xray/train/{NORMAL,PNEUMONIA}):")
        click.echo("  lungedge train --recipe xray-pneumonia --data chest_xray/train --out runs/xray")
        click.echo("  lungedge convert runs/xray --variants float32,float16,int8,int8-mixed")
        click.echo("  lungedge classify --model runs/xray/model_int8-mixed.tflite chest_xray/test/PNEUMONIA")


@click.command("pipeline")
@click.option("--recipe", "-r", required=True, help="Training recipe name (see `lungedge train --help`).")
@click.option("--data", "-d", required=True, type=click.Path(file_okay=False), help="Class-folder dataset.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Report folder to create.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a recipe field, e.g. --set epochs=5 (repeatable).")
@click.option("--variants", default="float32,float16,int8,int8-mixed", show_default=True,
              help="TFLite variants (see `lungedge convert --help`).")
@click.option("--test-data", type=click.Path(file_okay=False), default=None,
              help="Labelled folder for the quantisation report (default: the run's test split).")
@click.option("--calibration", type=click.IntRange(min=1), default=200, show_default=True,
              help="Calibration images for the integer variants.")
@click.option("--bench-runs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--bench-threads", default="1,2", show_default=True)
@click.option("--no-gate", is_flag=True, help="Do not fail the pipeline when a quantised variant loses accuracy.")
@handle_errors
def pipeline_cmd(recipe, data, out, overrides, variants, test_data, calibration, bench_runs, bench_threads, no_gate):
    """Train, convert to float32/float16/int8/int8-mixed, gate the quantisation, benchmark,
    classify, and write one report folder with an index (index.html, index.md).

    The gate passes when every float variant and at least one integer variant keep the Keras
    model's accuracy (see `lungedge convert --help`); the first passing integer variant
    (int8, then int8-float-io, then int8-mixed) is the one to ship and is used to classify.

    \b
    Example:
      lungedge pipeline --recipe xray-pneumonia --data chest_xray/train --out reports/xray

    A failing stage stops the pipeline (exit code 1) and keeps what earlier stages wrote.
    """
    from lungedge.pipeline import run_pipeline
    from train.recipes import apply_overrides, get_recipe

    started = time.perf_counter()
    resolved = apply_overrides(get_recipe(recipe), overrides)
    result = run_pipeline(resolved, data, out,
                          variants=[v.strip() for v in variants.split(",") if v.strip()], test_data=test_data,
                          calibration_count=calibration, bench_runs=bench_runs,
                          bench_threads=parse_int_list(bench_threads, "--bench-threads"), gate=not no_gate,
                          title=f"lungedge pipeline: {recipe}", log=lambda m: click.echo(m, err=True))
    _print_result(result, started, next_steps=False)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


@click.command("demo")
@click.option("--out", "-o", default="lungedge-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the generated data and the report.")
@click.option("--images-per-class", type=click.IntRange(min=20), default=200, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default: 40 with ImageNet weights, 30 without; early stopping).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bench-runs", type=click.IntRange(min=1), default=30, show_default=True)
@handle_errors
def demo_cmd(out, images_per_class, epochs, seed, bench_runs):
    """Run the whole pipeline offline on generated chest-radiograph-like images.

    Makes a seeded two-class set (NORMAL / PNEUMONIA with consolidation-like opacities),
    trains MobileNetV2 on it (ImageNet weights when they can be found, said plainly when not),
    converts to float32/float16/int8/int8-mixed, benchmarks and classifies, then prints where
    the report is.

    \b
    Example:
      lungedge demo --out /tmp/lungedge-demo
    """
    from lungedge.demo_data import make_demo_dataset
    from lungedge.pipeline import run_pipeline
    from train.recipes import get_recipe

    started = time.perf_counter()
    root = Path(out)
    data = make_demo_dataset(root / "data", per_class=images_per_class, seed=seed, progress=sys.stderr.isatty())
    overrides, note = demo_overrides(epochs, seed)
    click.echo(note, err=True)
    notes = [f"Data: {2 * images_per_class} procedurally generated images (seed {seed}) in {data}; "
             "they say nothing about real radiographs.", note]
    recipe = get_recipe("xray-pneumonia").replace(**overrides)
    result = run_pipeline(recipe, str(data), str(root / "report"),
                          calibration_count=100, bench_runs=bench_runs, title="lungedge demo", notes=notes,
                          log=lambda m: click.echo(m, err=True))
    _print_result(result, started, next_steps=True)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


def demo_overrides(epochs, seed):
    """Recipe overrides for the demo, and a sentence saying which weights it trains from."""
    from edge_runtime.errors import ConfigError
    from train.weights import find_imagenet_weights

    common = {"name": "demo", "split": "random", "fractions": (0.7, 0.15, 0.15), "seed": seed, "augment": False,
              "patience": 8, "monitor": "val_loss", "target_recall": None}
    try:
        path = find_imagenet_weights(1.0, 224)
        return ({**common, "weights": "imagenet", "epochs": epochs or 40},
                f"Using MobileNetV2 ImageNet weights from {path} (frozen base, new head).")
    except ConfigError:
        return ({**common, "weights": "none", "alpha": 0.35, "image_size": 96, "epochs": epochs or 30},
                "ImageNet weights not found (see `lungedge train --help` for how to provide them): training a "
                "small MobileNetV2 (alpha 0.35, 96 px) from random initialisation instead; expect lower accuracy.")


commands = [pipeline_cmd, demo_cmd]
