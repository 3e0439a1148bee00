"""One training run, start to finish, writing the run folder (see the contract in the README).

``train_run`` lists and checks the data, splits it (writing the manifest), trains the head
(on cached base features when the base is frozen and augmentation is off), optionally fine-tunes
the top blocks, chooses the decision threshold on validation data, evaluates on the test split
and writes model, spec, recipe, history, plots, metrics and model card. ``cv_run`` does the same
for each fold of a stratified k-fold and writes the per-fold table with mean and population std.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from edge_runtime.data import atomic_write_text
from edge_runtime import floor
from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.metrics import classification_metrics, format_report
from edge_runtime.spec import ModelSpec, Preprocessing, Threshold

from . import checkpoint as ck
from .data import (Dataset, class_weights, drop_unreadable, fingerprint, kfold_assignments, load_dataset,
                   read_manifest, split_dataset, write_manifest)
from .recipes import Recipe, get_recipe
from .tfimport import import_tf
from edge_runtime.decision import apply_threshold
from edge_runtime.operating_point import operating_point

from .labels import resolve_label

STRATEGIES = ("default", "mirrored", "multi-worker")


def preprocessing_for(recipe: Recipe) -> Preprocessing:
    """The model's preprocessing: MobileNetV2's (pixel - 127.5) / 127.5 at the recipe's size."""
    return Preprocessing(height=recipe.image_size, width=recipe.image_size, color_mode=recipe.color_mode,
                         resize="bilinear", mean=(127.5,), std=(127.5,))


def make_strategy(name: str):
    """``tf.distribute`` strategy: "default" (one device), "mirrored" (all GPUs, or all logical CPU
    devices when there is no GPU), "multi-worker" (``MultiWorkerMirroredStrategy``, from TF_CONFIG)."""
    tf, _ = import_tf()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def describe_device() -> str:
    tf, _ = import_tf()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s), mixed precision"
    return f"CPU ({os.cpu_count()} cores)"


def _log(verbose: int, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _prepare_out(out: Path, recipe: Optional[Recipe], resume: bool) -> Recipe:
    saved = out / "recipe.json"
    if resume:
        if not saved.is_file():
            if recipe is None:
                raise ConfigError(f"nothing to resume in {str(out)!r}: no recipe.json")
            return recipe
        previous = Recipe.from_json(saved.read_text())
        if recipe is not None and recipe != previous:
            diff = sorted(k for k, v in recipe.to_dict().items() if previous.to_dict().get(k) != v)
            raise ConfigError(f"--resume with a different recipe than the interrupted run in {str(out)!r} (differs in {diff})")
        return previous
    if recipe is None:
        raise ConfigError("a recipe is needed (--recipe NAME)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {str(out)!r} is not empty; use --resume to continue a run there, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(saved), recipe.to_json())
    return recipe


def train_run(recipe: Union[Recipe, str, None], data_dir: str, out_dir: str, *, resume: bool = False,
              strategy: str = "default", verbose: int = 1, learning_floor: bool = True) -> Path:
    """Train one model and write a complete run folder.

    Args:
        recipe: a ``Recipe`` or recipe name (None with ``resume``: the saved one).
        data_dir: a class-folder tree or the Kaggle chest X-ray layout.
        out_dir: the run folder (created; must be empty unless ``resume``).
        resume: continue an interrupted run in ``out_dir`` from its last epoch checkpoint.
        strategy: "default", "mirrored" or "multi-worker".
        verbose: 0 silent, 1 Keras progress bars and messages, 2 one line per epoch.
        learning_floor: raise when the model did not learn (``edge_runtime.floor``); False only
            records the verdict (tests of the run-folder contract on tiny untrained models).

    Returns:
        The run folder.

    Raises:
        ConfigError: bad recipe, data layout, split or output folder; ImageNet weights missing.
        MissingDependencyError: TensorFlow is not installed.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    out = Path(out_dir)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    recipe = _prepare_out(out, recipe, resume)
    if resume and (out / "model.keras").is_file() and (out / "metrics.json").is_file() and not (out / "checkpoints").exists():
        _log(verbose, f"run in {out} is already complete")
        return out
    ds = _checked_dataset(recipe, data_dir, verbose)
    manifest = out / "split_manifest.csv"
    if resume and manifest.is_file():
        assignment = read_manifest(manifest, ds)
    else:
        assignment = split_dataset(ds, recipe.fractions, recipe.split, recipe.seed)
        write_manifest(manifest, ds, assignment)
    ctx = _Context(recipe, strategy, verbose)
    _fit_and_report(recipe, ds, assignment, out, ctx, learning_floor=learning_floor)
    return out


def cv_run(recipe: Union[Recipe, str], data_dir: str, out_dir: str, k: int, *, strategy: str = "default",
           verbose: int = 1, learning_floor: bool = True) -> Path:
    """Stratified k-fold cross-validation (patient-grouped when the recipe's split is "grouped").

    Each fold is a complete run folder ``out_dir/fold_<i>`` (test = that fold; validation carved,
    stratified, from the rest); ``cv_summary.json`` and ``cv_table.md`` hold the per-fold table
    with mean and population standard deviation (as the CT paper's Table IV). With the base frozen
    and no augmentation, base features are computed once for all folds.

    Returns:
        ``out_dir``.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {str(out)!r} is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out / "recipe.json"), recipe.to_json())
    ds = _checked_dataset(recipe, data_dir, verbose)
    train_f, val_f, _ = recipe.fractions
    folds = kfold_assignments(ds, k, val_f / (train_f + val_f), recipe.split, recipe.seed)
    ctx = _Context(recipe, strategy, verbose)
    features = None
    if ctx.feature_mode(recipe):
        _log(verbose, f"computing base features once for all {len(ds)} images")
        built = ctx.build(len(ds.class_names))
        features = _predict_features(ctx, built, ds.paths, preprocessing_for(recipe), recipe.batch_size)
    rows = []
    for i, assignment in enumerate(folds, start=1):
        _log(verbose, f"--- fold {i}/{k} ---")
        fold_dir = out / f"fold_{i}"
        fold_dir.mkdir()
        atomic_write_text(str(fold_dir / "recipe.json"), recipe.to_json())
        write_manifest(fold_dir / "split_manifest.csv", ds, assignment)
        m = _fit_and_report(recipe, ds, assignment, fold_dir, ctx, features=features, learning_floor=learning_floor)
        rows.append({"fold": i, "n_test": m["n"], "accuracy": m["accuracy"], "argmax_accuracy": m["argmax"]["accuracy"],
                     "macro_precision": m["macro"]["precision"], "macro_recall": m["macro"]["recall"],
                     "macro_f1": m["macro"]["f1"], "weighted_f1": m["weighted"]["f1"],
                     **{f"recall_{n}": m["per_class"][n]["recall"] for n in ds.class_names}})
    summary = _cv_summary(rows)
    summary.update({"k": k, "recipe": recipe.name, "data": str(data_dir), "split": recipe.split,
                    "std_kind": "population (ddof=0)", "failures": ds.failures})
    atomic_write_text(str(out / "cv_summary.json"), json.dumps(summary, indent=2))
    table = cv_table_markdown(summary)
    atomic_write_text(str(out / "cv_table.md"), table)
    _log(verbose, table)
    return out


def _cv_summary(rows):
    keys = [k for k in rows[0] if k not in ("fold", "n_test")]
    return {"folds": rows,
            "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
            "std": {k: float(np.std([r[k] for r in rows], ddof=0)) for k in keys}}


def cv_table_markdown(summary: dict) -> str:
    """Per-fold table with mean ± population standard deviation (percent)."""
    keys = [k for k in summary["folds"][0] if k not in ("fold", "n_test")]
    head = "| fold | n test | " + " | ".join(keys) + " |"
    lines = [f"# {summary.get('k', len(summary['folds']))}-fold cross-validation: {summary.get('recipe', '')}", "",
             head, "|---|---|" + "---|" * len(keys)]
    for r in summary["folds"]:
        lines.append(f"| {r['fold']} | {r['n_test']} | " + " | ".join(f"{100 * r[k]:.2f}" for k in keys) + " |")
    lines.append("| mean ± std | | " + " | ".join(
        f"{100 * summary['mean'][k]:.2f} ± {100 * summary['std'][k]:.2f}" for k in keys) + " |")
    lines += ["", "Values in percent; std is the population standard deviation (ddof=0). `accuracy` uses the stored "
              "decision rule (threshold if the recipe sets one), `argmax_accuracy` the most probable class."]
    return "\n".join(lines) + "\n"


def _checked_dataset(recipe: Recipe, data_dir: str, verbose: int) -> Dataset:
    ds = load_dataset(data_dir)
    _log(verbose, f"data {data_dir}: {len(ds)} images, classes {dict(ds.counts())}")
    ds = drop_unreadable(ds, preprocessing_for(recipe), progress=verbose > 0)
    if ds.failures:
        _log(verbose, f"{len(ds.failures)} unreadable file(s) left out:")
        for f in ds.failures[:20]:
            _log(verbose, f"  {f['error']}")
        if len(ds.failures) > 20:
            _log(verbose, f"  ... and {len(ds.failures) - 20} more (all listed in metrics.json)")
    return ds


class _Context:
    """TensorFlow set-up shared by the runs of one process: devices, precision, strategy."""

    def __init__(self, recipe: Recipe, strategy: str, verbose: int):
        tf, keras = import_tf()
        self.tf, self.keras, self.verbose = tf, keras, verbose
        self.recipe, self.recipe_seed = recipe, recipe.seed
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        if self.gpu:
            keras.mixed_precision.set_global_policy("mixed_float16")
        self.strategy = make_strategy(strategy)
        self.device = describe_device() + (f", strategy {strategy} ({self.strategy.num_replicas_in_sync} replicas)"
                                           if strategy != "default" else "")

    @staticmethod
    def feature_mode(recipe: Recipe) -> bool:
        """Base frozen and no augmentation: the base's output is fixed, so compute it once."""
        return recipe.augmentation is None and not recipe.from_scratch

    def build(self, num_classes: int):
        from .model import build_model

        self.keras.utils.set_random_seed(self.recipe_seed)
        with self.strategy.scope():
            return build_model(self.recipe, num_classes)


def _predict_features(ctx, built, paths, prep, batch_size):
    from .input_data import image_dataset

    ds = image_dataset(paths, None, prep, batch_size, cache=None)
    return np.asarray(built.features.predict(ds, verbose=1 if ctx.verbose == 1 else 0), dtype=np.float32)


def _fit_and_report(recipe: Recipe, ds: Dataset, assignment: np.ndarray, out: Path, ctx: _Context,
                    features: Optional[np.ndarray] = None, learning_floor: bool = True) -> dict:
    """Train on ``assignment``'s train split, choose the threshold on val, evaluate on test, write everything."""
    from .model import compile_model, unfreeze_top
    from .input_data import decode_dataset, image_dataset

    t_start = time.perf_counter()
    tf, keras, verbose = ctx.tf, ctx.keras, ctx.verbose
    ctx.recipe, ctx.recipe_seed = recipe, recipe.seed
    names = list(ds.class_names)
    n = len(names)
    prep = preprocessing_for(recipe)
    split = {s: np.flatnonzero(assignment == s) for s in ("train", "val", "test")}
    for s, idx in split.items():
        if len(idx) == 0:
            raise ConfigError(f"the {s} split is empty ({len(ds)} images); use more data or other fractions")
    y = {s: ds.labels[idx] for s, idx in split.items()}
    paths = {s: [ds.paths[i] for i in idx] for s, idx in split.items()}
    positive = resolve_label(recipe.positive_label, names) if recipe.target_recall else _soft_label(recipe.positive_label, names)
    built = ctx.build(n)
    state = ck.TrainState.load(out / "checkpoints")
    cw = class_weights(y["train"], n) if recipe.class_weights else None
    if cw:
        _log(verbose, "class weights: " + ", ".join(f"{names[i]} {w:.3f}" for i, w in cw.items()))
    feature_mode = ctx.feature_mode(recipe)
    if feature_mode and features is None:
        cache = state.path("features.npy")
        if cache.is_file():
            features = np.load(cache)
        else:
            _log(verbose, f"base frozen, no augmentation: computing base features once for {len(ds)} images")
            features = _predict_features(ctx, built, ds.paths, prep, recipe.batch_size)
            state.folder.mkdir(parents=True, exist_ok=True)
            np.save(cache, features)
    decoded = {}

    def images(s):  # decoded uint8 images of a split, cached in memory, shared by all phases
        if s not in decoded:
            decoded[s] = decode_dataset(paths[s], prep).cache()
        return decoded[s]

    phases = [("head", recipe.epochs, recipe.learning_rate, recipe.lr_schedule)]
    if recipe.fine_tune.enabled:
        phases.append(("fine_tune", recipe.fine_tune.epochs, recipe.fine_tune.learning_rate, "constant"))
    steps_per_epoch = -(-len(split["train"]) // recipe.batch_size)
    offset = 0
    for phase, epochs, lr, schedule in phases:
        if phase in state.done:
            offset += sum(1 for r in state.history if r["phase"] == phase)
            continue
        if phase == "fine_tune":
            unfreeze_top(built.base, recipe.fine_tune.blocks)
        on_features = feature_mode and phase == "head"
        fit_model = built.head if on_features else built.model
        with ctx.strategy.scope():
            compile_model(fit_model, lr, schedule, epochs * steps_per_epoch)
        if state.done:  # a later phase starts from the end of the previous one
            _load_weights(built.model, state.path(f"phase_{state.done[-1]}.weights.h5"))
        start = state.start_phase(phase)
        if start > 0:
            _load_weights(fit_model, state.path(ck.LAST_WEIGHTS))
            ok = ck.load_optimizer(fit_model.optimizer, fit_model.trainable_variables, state.path(ck.LAST_OPTIMIZER))
            _log(verbose, f"resuming phase {phase} after epoch {start}" + ("" if ok else " (optimizer state not restored)"))
        if not state.stopped and start < epochs:
            callback = ck.make_callback(state, built.model, recipe.monitor, recipe.patience, offset, verbose)
            n_trainable = sum(int(np.prod(v.shape)) for v in fit_model.trainable_variables)
            _log(verbose, f"phase {phase}: up to {epochs} epochs at lr {lr}, {n_trainable:,} trainable parameters"
                          + (" (head on cached base features)" if on_features else ""))
            if on_features:
                fit_model.fit(features[split["train"]], y["train"], batch_size=recipe.batch_size, epochs=epochs,
                              initial_epoch=start, validation_data=(features[split["val"]], y["val"]), shuffle=True,
                              class_weight=cw, callbacks=[callback], verbose=verbose)
            else:
                train_ds = image_dataset(paths["train"], y["train"], prep, recipe.batch_size, training=True,
                                         augment=recipe.augmentation, seed=recipe.seed + len(state.history),
                                         decoded=images("train"))
                val_ds = image_dataset(paths["val"], y["val"], prep, recipe.batch_size, decoded=images("val"))
                fit_model.fit(train_ds, epochs=epochs, initial_epoch=start, validation_data=val_ds,
                              class_weight=cw, shuffle=False, callbacks=[callback], verbose=verbose)
        if recipe.patience and state.path(ck.BEST_WEIGHTS).is_file():
            _load_weights(built.model, state.path(ck.BEST_WEIGHTS))
            _log(verbose, f"restored the best weights ({recipe.monitor} {state.best:.4f})")
        ck.save_weights_atomic(built.model, state.path(f"phase_{phase}.weights.h5"))
        state.finish_phase()
        offset += sum(1 for r in state.history if r["phase"] == phase)

    # predictions on validation and test: from cached features when the base was never trained
    def predict(s):
        if feature_mode and not recipe.fine_tune.enabled:
            return np.asarray(built.head.predict(features[split[s]], batch_size=256, verbose=0), dtype=np.float64)
        data = image_dataset(paths[s], None, prep, recipe.batch_size, decoded=images(s))
        return np.asarray(built.model.predict(data, verbose=0), dtype=np.float64)

    p_val, p_test = predict("val"), predict("test")
    threshold = None
    pos_index = names.index(positive) if positive else None
    if recipe.target_recall and positive:
        value = operating_point(p_val, y["val"], pos_index, recipe.target_recall)
        threshold = Threshold(positive, value, recipe.target_recall, "validation")
        _log(verbose, f"threshold: {positive} when p >= {value:.4f} (validation recall >= {recipe.target_recall})")
    th_value = threshold.value if threshold else None
    test_pred = apply_threshold(p_test, pos_index, th_value)
    test_m = classification_metrics(y["test"], test_pred, names, p_test)
    verdict = floor.judge(y["test"], test_pred, names)
    argmax_m = classification_metrics(y["test"], p_test.argmax(1), names, p_test)
    val_m = classification_metrics(y["val"], apply_threshold(p_val, pos_index, th_value), names, p_val)
    seconds = time.perf_counter() - t_start  # this process only; a resumed run adds its earlier epochs below

    spec = ModelSpec(
        labels=tuple(names), preprocessing=prep, output="probabilities", positive_label=positive, threshold=threshold,
        recipe=recipe.name, variant=None, training_fingerprint=fingerprint(ds, assignment),
        versions={"tensorflow": tf.__version__, "keras": keras.__version__, "lungedge": _version()},
        extra={"alpha": recipe.alpha, "split": recipe.split, "weights": recipe.weights})
    _write_model(built.model, out / "model.keras")
    atomic_write_text(str(out / "spec.json"), spec.to_json())
    atomic_write_text(str(out / "recipe.json"), recipe.to_json())
    from .report import model_card, plot_confusion, plot_history, plot_roc, write_history

    write_history(out / "history.csv", state.history)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_history(plots / "training_curves.png", state.history, f"{recipe.name}: training",
                 restored_epoch=_restored_epoch(state.history, recipe))
    plot_confusion(plots / "confusion_matrix.png", test_m["confusion_matrix"], names,
                   f"{recipe.name}: test ({'threshold' if threshold else 'argmax'})")
    plot_roc(plots / "roc.png", y["test"], p_test, names, f"{recipe.name}: test ROC")
    counts = {s: {names[c]: int((y[s] == c).sum()) for c in range(n)} for s in split}
    metrics = dict(test_m)
    metrics.update({
        "split": "test", "decision": "threshold" if threshold else "argmax",
        "threshold": threshold.to_dict() if threshold else None,
        "argmax": argmax_m, "validation": val_m, "counts": counts, "failures": ds.failures,
        "epochs_run": len(state.history), "train_seconds": round(seconds, 1),
        "epoch_seconds_total": round(state.seconds, 1), "device": ctx.device,
        "recipe": recipe.name, "data": str(ds.root), "learning_floor": verdict.to_dict(),
    })
    atomic_write_text(str(out / "metrics.json"), json.dumps(metrics, indent=2))
    is_ct = recipe.name.startswith("ct") or any(h in x.lower() for x in names for h in ("bengin", "benign", "malignant"))
    card = model_card(recipe, spec, counts, test_m, argmax_m, val_m, str(ds.root), ds.failures, seconds, ctx.device,
                      is_ct=is_ct, fixed_test=ds.fixed_split is not None, verdict=verdict)
    atomic_write_text(str(out / "model_card.md"), card)
    _cleanup(state.folder)
    _log(verbose, f"test ({metrics['decision']}):\n{format_report(test_m)}")
    _log(verbose, verdict.sentence())
    if verdict.failed and learning_floor:
        raise ModelError(f"{verdict.sentence()} (run folder {out} kept for diagnosis)")
    return metrics


def _restored_epoch(history, recipe: Recipe) -> Optional[int]:
    """The epoch whose weights early stopping restored (the best of the last phase), or None."""
    if not recipe.patience or not history:
        return None
    last = [r for r in history if r.get("phase") == history[-1].get("phase") and r.get(recipe.monitor) is not None]
    if not last:
        return None
    pick = min if recipe.monitor == "val_loss" else max
    return int(pick(last, key=lambda r: r[recipe.monitor])["epoch"])


def _soft_label(name: Optional[str], names) -> Optional[str]:
    """The positive label if it matches a class, else None (recipes without a threshold may run on other data)."""
    try:
        return resolve_label(name, names)
    except ConfigError:
        return None


def _load_weights(model, path: Path) -> None:
    """Load model weights only (the optimizer state is restored separately, when resuming)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(path))


def _write_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}-tmp{os.getpid()}.keras")
    model.save(str(tmp))
    os.replace(tmp, path)


def _cleanup(folder: Path) -> None:
    """Remove the checkpoints of a finished run (the model is saved; they only serve --resume)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def _version() -> str:
    from lungedge import __version__

    return __version__
