"""``lungedge train``: the click command over ``train.training`` (TensorFlow imported only when it runs)."""

from __future__ import annotations

import click

from lungedge.cli_util import handle_errors
from lungedge.train.recipes import SPLITS

_OVERRIDES = (
    # (option, recipe field, click type, help)
    ("--epochs", "epochs", click.IntRange(min=1), "Epochs of the first (frozen-base) phase."),
    ("--batch-size", "batch_size", click.IntRange(min=1), "Batch size (global, over all replicas)."),
    ("--learning-rate", "learning_rate", float, "Adam learning rate of the first phase."),
    ("--image-size", "image_size", click.IntRange(min=32), "Input size in pixels (square)."),
    ("--alpha", "alpha", float, "MobileNetV2 width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)."),
    ("--weights", "weights", str, "Base weights: imagenet, none, or a weights file path."),
    ("--split", "split", click.Choice(list(SPLITS)),
     "random: stratified per class; grouped: also by patient; blocked: also by blocks of consecutive slice numbers "
     "(numbered CT slices without patient ids; block size: --set split_block=N, default 16)."),
    ("--patience", "patience", click.IntRange(min=0), "Early-stopping patience (0: off)."),
    ("--target-recall", "target_recall", float, "Choose the threshold for this recall of the positive class."),
    ("--positive-label", "positive_label", str, "The disease class (for the threshold)."),
    ("--seed", "seed", click.IntRange(min=0), "Seed for the split, initialisation and shuffling."),
)


def _recipe_options(f):
    for opt, _field, typ, text in reversed(_OVERRIDES):
        f = click.option(opt, type=typ, default=None, help=text)(f)
    return f


@click.command("train")
@click.option("--recipe", "-r", "recipe_name", default=None,
              help="Named recipe: xray-pneumonia, ct-lung-cancer, xray-pneumonia-plus, ct-lung-cancer-plus.")
@click.option("--data", "-d", "data_dir", type=click.Path(), default=None,
              help="Labelled data: DIR/<class>/<image>, or the Kaggle layout DIR/{train,val,test}/<class>.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=False, default=None,
              help="Run folder to create (must be empty unless --resume).")
@_recipe_options
@click.option("--augment/--no-augment", default=None, help="Augment the training images (radiograph-safe).")
@click.option("--class-weights/--no-class-weights", default=None, help="Balanced class weights.")
@click.option("--fine-tune-epochs", type=click.IntRange(min=0), default=None, help="Epochs of the fine-tuning phase (0: none).")
@click.option("--fine-tune-blocks", type=click.IntRange(min=0, max=16), default=None, help="Top blocks to unfreeze.")
@click.option("--fine-tune-lr", type=float, default=None, help="Learning rate of the fine-tuning phase.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="Any recipe field (repeatable), e.g. --set fractions=[0.7,0.15,0.15] --set augment.rotation=5.")
@click.option("--cv", type=click.IntRange(min=2), default=None,
              help="Stratified K-fold cross-validation instead of one run (table with mean ± population std).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last epoch checkpoint "
              "(with --cv K: keep the complete folds, continue the interrupted one, train the rest).")
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multi-worker"]), default="default",
              show_default=True, help="tf.distribute strategy (mirrored: all GPUs; multi-worker: TF_CONFIG).")
@click.option("--cache-mb", type=click.IntRange(min=0), default=None,
              help="Memory for decoded images, MB (default: LUNGEDGE_CACHE_MB or 2048); splits beyond it are "
                   "cached on disk in the run folder while training.")
@click.option("--teacher", type=click.Path(file_okay=False), default=None,
              help="The run folder (with --cv: the cross-validation folder) of the teacher, for a recipe that "
                   "distils (xray-pneumonia-micro learns from an xray-pneumonia-plus run).")
@click.option("--list-recipes", is_flag=True, help="Print the named recipes (resolved, as JSON) and exit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@handle_errors
def train_cmd(recipe_name, data_dir, out_dir, augment, class_weights, fine_tune_epochs, fine_tune_blocks, fine_tune_lr,
              sets, cv, resume, strategy, cache_mb, teacher, list_recipes, quiet, **overrides):
    """Fine-tune MobileNetV2 on lung images and write a run folder.

    \b
    Examples:
      lungedge train --recipe ct-lung-cancer --data "shared/data/iq_othnccd/The IQ-OTHNCCD lung cancer dataset" --out runs/ct
      lungedge train --recipe xray-pneumonia --data shared/data/chest_xray/train --out runs/xray --epochs 5
      lungedge train --recipe ct-lung-cancer --data DIR --out runs/ct-cv5 --cv 5
      lungedge train --recipe xray-pneumonia-micro --data DIR --out runs/micro --teacher runs/xplus
      lungedge train --out runs/xray --data shared/data/chest_xray/train --resume
      lungedge train --out runs/ct-cv5 --data DIR --cv 5 --resume

    The run folder holds model.keras, spec.json, recipe.json, split_manifest.csv, history.csv,
    metrics.json, model_card.md and plots/. Uses a GPU when present, else the CPU.
    ImageNet weights are read offline (KERAS_HOME/models or LUNGEDGE_IMAGENET_WEIGHTS).
    """
    import json

    from lungedge.edge_runtime.errors import ConfigError

    from lungedge.train.recipes import RECIPES, customize, get_recipe

    if list_recipes:
        click.echo(json.dumps({k: r.to_dict() for k, r in RECIPES.items()}, indent=2))
        return
    if not data_dir or not out_dir:
        raise ConfigError("--data and --out are required (see lungedge train --help)")
    recipe = None
    if recipe_name:
        recipe = get_recipe(recipe_name)
    elif not resume:
        raise ConfigError("--recipe is required (valid: " + ", ".join(sorted(RECIPES)) + ")")
    if recipe is not None:
        fields = {field: overrides.get(opt.lstrip("-").replace("-", "_")) for opt, field, _, _ in _OVERRIDES}
        recipe = customize(recipe, fields, augment=augment, class_weights=class_weights,
                           fine_tune={"epochs": fine_tune_epochs, "blocks": fine_tune_blocks,
                                      "learning_rate": fine_tune_lr}, sets=sets)
    if quiet:
        from lungedge.verbosity import QUIET, configure

        configure(QUIET)
    if cv:
        from lungedge.train.training import cv_run

        out = cv_run(recipe, data_dir, out_dir, cv, resume=resume, strategy=strategy, cache_mb=cache_mb, teacher=teacher)
        click.echo(f"cross-validation written to {out}")
    else:
        from lungedge.train.training import train_run

        out = train_run(recipe, data_dir, out_dir, resume=resume, strategy=strategy, cache_mb=cache_mb, teacher=teacher)
        click.echo(f"run folder: {out}")

