"""One training run, start to finish, writing the run folder (see the contract in the README).

``train_run`` lists and checks the data, splits it (writing the manifest), trains the head
(on cached base features when the base is frozen and augmentation is off), optionally fine-tunes
the top blocks, chooses the decision threshold on validation data, evaluates on the test split
and writes model, spec, recipe, history, plots, metrics and model card. ``cv_run`` does the same
for each fold of a stratified k-fold and writes the per-fold table with mean and population std.
"""

from __future__ import annotations

import json
import logging
import shutil
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from lungedge.edge_runtime import learning_floor as floor
from lungedge.edge_runtime.atomic_write import atomic_write_text
from lungedge.edge_runtime.decision import apply_threshold
from lungedge.edge_runtime.errors import ConfigError, ModelError
from lungedge.edge_runtime.metrics import classification_metrics, format_report
from lungedge.edge_runtime.operating_point import operating_point
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing, Threshold
from lungedge.edge_runtime.version import package_version

from . import checkpoint as ck
from .dataset import (Dataset, class_weights, drop_unreadable, fingerprint, kfold_assignments, load_dataset,
                   read_manifest, split_dataset, write_manifest)
from .intended import intended_for
from .recipes import Recipe, get_recipe, recipe_diff
from .labels import resolve_label
from .runfolder import CARD, CHECKPOINTS, HISTORY, IMAGE_CACHE, MANIFEST, METRICS, MODEL, PLOTS, RECIPE, SPEC
from .tfimport import import_tf, keras_verbosity

_LOG = logging.getLogger(__name__)

#: a cross-validation folder's number of folds, written before the first fold (checked by --resume)
CV_PLAN = "cv_plan.json"

STRATEGIES = ("default", "mirrored", "multi-worker")


def preprocessing_for(recipe: Recipe) -> Preprocessing:
    """The model's preprocessing: MobileNetV2's (pixel - 127.5) / 127.5 at the recipe's size, after
    the recipe's contrast normalisation (CLAHE with the default clip limit 2 and 8x8 tiles, or none)."""
    return Preprocessing(height=recipe.image_size, width=recipe.image_size, color_mode=recipe.color_mode,
                         resize="bilinear", mean=(127.5,), std=(127.5,), contrast=recipe.contrast)


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


def is_chief() -> bool:
    """Whether this process writes the results in a ``MultiWorkerMirroredStrategy`` cluster
    (``TF_CONFIG``): the task of type "chief", or worker 0 when the cluster has no chief.

    Raises:
        ConfigError: TF_CONFIG is not valid JSON.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    try:
        config = json.loads(raw)
        task, cluster = config.get("task", {}), config.get("cluster", {})
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"TF_CONFIG is not a JSON object with 'cluster' and 'task': {exc}") from None
    if task.get("type") == "chief":
        return True
    return "chief" not in cluster and task.get("type") == "worker" and int(task.get("index", 0)) == 0


def describe_device() -> str:
    tf, _ = import_tf()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s), mixed precision"
    return f"CPU ({os.cpu_count()} cores)"


def _prepare_out(out: Path, recipe: Optional[Recipe], resume: bool) -> Recipe:
    saved = out / RECIPE
    if resume:
        if not saved.is_file():
            if recipe is None:
                raise ConfigError(f"nothing to resume in {str(out)!r}: no recipe.json")
            return recipe
        previous = Recipe.from_json(saved.read_text())
        if recipe is not None and recipe != previous:
            diff = [k for k, _, _ in recipe_diff(previous, recipe)]
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
              strategy: str = "default", learning_floor: bool = True,
              cache_mb: Optional[int] = None, teacher: Optional[str] = None) -> Path:
    """Train one model and write a complete run folder.

    Args:
        recipe: a ``Recipe`` or recipe name (None with ``resume``: the saved one).
        data_dir: a class-folder tree or the Kaggle chest X-ray layout.
        out_dir: the run folder (created; must be empty unless ``resume``).
        resume: continue an interrupted run in ``out_dir`` from its last epoch checkpoint.
        strategy: "default", "mirrored" or "multi-worker".
        learning_floor: raise when the model did not learn (``edge_runtime.learning_floor``); False only
            records the verdict (tests of the run-folder contract on tiny untrained models).
        cache_mb: memory for decoded images, MB (``train.input_data.cache_budget_mb``: default
            LUNGEDGE_CACHE_MB or 2048); splits beyond it are cached on disk in the run folder.
        teacher: the run folder of the recipe's teacher (recipes that distil, ``train.distill``);
            with ``resume`` not needed once the interrupted run has asked it.

    Returns:
        The run folder.

    Raises:
        ConfigError: bad recipe, data layout, split or output folder; ImageNet weights missing.
        MissingDependencyError: TensorFlow is not installed.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    _check_teacher_given(recipe, teacher)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "multi-worker" and not is_chief():
        # every worker trains in lockstep; only the chief writes the run folder (a worker's own
        # checkpoints and files go to a private temporary folder, removed at the end)
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="lungedge-worker-")
        try:
            _train_into(Path(scratch), recipe, data_dir, False, strategy, learning_floor, cache_mb, teacher)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Path(out_dir)
    return _train_into(Path(out_dir), recipe, data_dir, resume, strategy, learning_floor, cache_mb, teacher)


def _train_into(out: Path, recipe: Optional[Recipe], data_dir: str, resume: bool, strategy: str,
                learning_floor: bool, cache_mb: Optional[int] = None, teacher: Optional[str] = None) -> Path:
    recipe = _prepare_out(out, recipe, resume)
    if resume and _run_complete(out):
        _LOG.info(f"run in {out} is already complete")
        return out
    ds = _checked_dataset(recipe, data_dir)
    manifest = out / MANIFEST
    if resume and manifest.is_file():
        assignment = read_manifest(manifest, ds)
    else:
        assignment = split_dataset(ds, recipe.fractions, recipe.split, recipe.seed, recipe.split_block)
        write_manifest(manifest, ds, assignment)
    ctx = _Context(strategy, cache_mb)
    try:
        _fit_and_report(recipe, ds, assignment, out, ctx, learning_floor=learning_floor, teacher=teacher)
    finally:
        ctx.close()
    return out


def cv_run(recipe: Union[Recipe, str, None], data_dir: str, out_dir: str, k: int, *, resume: bool = False,
           strategy: str = "default", learning_floor: bool = True,
           cache_mb: Optional[int] = None, teacher: Optional[str] = None) -> Path:
    """Stratified k-fold cross-validation (patient-grouped when the recipe's split is "grouped", by
    blocks of consecutive slice numbers when "blocked").

    Each fold is a complete run folder ``out_dir/fold_<i>`` (test = that fold; validation carved,
    stratified, from the rest); ``cv_summary.json`` and ``cv_table.md`` hold the per-fold table
    with mean and population standard deviation (as the CT paper's Table IV). With the base frozen
    and no augmentation, base features are computed once for all folds.

    With ``resume`` (``recipe`` None: the saved one), an interrupted cross-validation goes on in
    ``out_dir``: complete folds are kept (their manifests must be the folds the recipe, seed and
    data give again), the fold that was interrupted continues from its last epoch checkpoint, and
    the rest are trained.

    A recipe that distils needs a teacher per fold: ``teacher`` is then a cross-validation folder
    of the teacher's recipe with the same ``k`` (its ``fold_<i>`` teaches fold ``i``; the folds must
    match, which ``train.distill`` checks image by image).

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: as ``train_run``; with ``resume``, a saved fold whose split differs.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    _check_teacher_given(recipe, teacher)
    out = Path(out_dir)
    recipe = _prepare_out(out, recipe, resume)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RECIPE).is_file():
        atomic_write_text(str(out / RECIPE), recipe.to_json())
    ds = _checked_dataset(recipe, data_dir)
    train_f, val_f, _ = recipe.fractions
    folds = kfold_assignments(ds, k, val_f / (train_f + val_f), recipe.split, recipe.seed,
                              recipe.split_block)
    if resume:
        _check_saved_folds(out, ds, folds)
    atomic_write_text(str(out / CV_PLAN), json.dumps({"k": k, "data": str(data_dir)}))
    ctx = _Context(strategy, cache_mb)
    try:
        rows = _cv_folds(recipe, ds, folds, out, ctx, learning_floor, teacher)
    finally:
        ctx.close()
    summary = _cv_summary(rows)
    summary.update({"k": k, "recipe": recipe.name, "data": str(data_dir), "split": recipe.split,
                    "std_kind": "population (ddof=0)", "failures": ds.failures})
    atomic_write_text(str(out / "cv_summary.json"), json.dumps(summary, indent=2))
    table = cv_table_markdown(summary)
    atomic_write_text(str(out / "cv_table.md"), table)
    _LOG.info(table)
    return out


def _check_teacher_given(recipe: Optional[Recipe], teacher: Optional[str]) -> None:
    if teacher is not None and recipe is not None and not recipe.distills:
        raise ConfigError(f"--teacher is for a recipe that distils; {recipe.name!r} has distill 0")


def _run_complete(folder: Path) -> bool:
    """A run folder (or a CV fold) that finished: model and metrics written, checkpoints removed."""
    return (folder / MODEL).is_file() and (folder / METRICS).is_file() and not (folder / CHECKPOINTS).exists()


def _check_saved_folds(out: Path, ds: Dataset, folds) -> None:
    """The cross-validation in ``out`` was started with as many folds, and every saved fold's
    manifest is the fold computed again (same data, recipe and seed)."""
    plan = out / CV_PLAN
    if plan.is_file():
        try:
            k = int(json.loads(plan.read_text())["k"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"damaged {str(plan)!r} ({type(exc).__name__}: {exc})") from None
        if k != len(folds):
            raise ConfigError(f"the cross-validation in {str(out)!r} was started with --cv {k}; resume it with --cv {k}")
    for i, assignment in enumerate(folds, start=1):
        manifest = out / f"fold_{i}" / MANIFEST
        if manifest.is_file() and not np.array_equal(read_manifest(manifest, ds), assignment):
            raise ConfigError(f"{str(manifest)!r} is not the fold that this recipe, seed and data give; "
                              "resume needs the same data, recipe and --cv")


def _cv_row(i: int, m: dict, class_names) -> dict:
    """One fold's row of the CV table, from its metrics."""
    return {"fold": i, "n_test": m["n"], "accuracy": m["accuracy"], "argmax_accuracy": m["argmax"]["accuracy"],
            "macro_precision": m["macro"]["precision"], "macro_recall": m["macro"]["recall"],
            "macro_f1": m["macro"]["f1"], "weighted_f1": m["weighted"]["f1"],
            **{f"recall_{n}": m["per_class"][n]["recall"] for n in class_names}}


def _saved_fold_row(i: int, fold_dir: Path, class_names, learning_floor: bool) -> dict:
    """A complete fold's row, from its saved metrics; its learning-floor verdict holds as when it was trained."""
    try:
        m = json.loads((fold_dir / METRICS).read_text())
        row = _cv_row(i, m, class_names)
        status, sentence = m["learning_floor"]["status"], m["learning_floor"]["sentence"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"damaged {str(fold_dir / METRICS)!r} ({type(exc).__name__}: {exc}); delete the "
                          f"{str(fold_dir)!r} folder to train that fold again") from None
    if status == floor.NOT_LEARNED and learning_floor:
        raise ModelError(f"{sentence} (fold {str(fold_dir)!r}; delete it to train that fold again)")
    return row


def _cv_folds(recipe: Recipe, ds: Dataset, folds, out: Path, ctx: _Context, learning_floor: bool,
              teacher: Optional[str] = None) -> list:
    """Train and judge every fold (one feature pass for all when the base is frozen); one row each.
    A complete fold folder (a resumed cross-validation) is read, not trained again."""
    features = None
    if ctx.feature_mode(recipe) and not all(_run_complete(out / f"fold_{i}") for i in range(1, len(folds) + 1)):
        _LOG.info(f"computing base features once for all {len(ds)} images")
        built = ctx.build(recipe, len(ds.class_names))
        features = _predict_features(ctx, built, ds.paths, preprocessing_for(recipe), recipe.batch_size)
    rows = []
    for i, assignment in enumerate(folds, start=1):
        fold_dir = out / f"fold_{i}"
        if _run_complete(fold_dir):
            _LOG.info(f"--- fold {i}/{len(folds)}: complete, kept ---")
            rows.append(_saved_fold_row(i, fold_dir, ds.class_names, learning_floor))
            continue
        _LOG.info(f"--- fold {i}/{len(folds)} ---")
        fold_dir.mkdir(exist_ok=True)
        atomic_write_text(str(fold_dir / RECIPE), recipe.to_json())
        if not (fold_dir / MANIFEST).is_file():
            write_manifest(fold_dir / MANIFEST, ds, assignment)
        m = _fit_and_report(recipe, ds, assignment, fold_dir, ctx, features=features, learning_floor=learning_floor,
                            teacher=str(Path(teacher) / f"fold_{i}") if teacher else None)
        rows.append(_cv_row(i, m, ds.class_names))
    return rows


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


def _checked_dataset(recipe: Recipe, data_dir: str) -> Dataset:
    ds = load_dataset(data_dir)
    _LOG.info(f"data {data_dir}: {len(ds)} images, classes {dict(ds.counts())}")
    ds = drop_unreadable(ds, preprocessing_for(recipe))
    if ds.failures:
        _LOG.info(f"{len(ds.failures)} unreadable file(s) left out:")
        for f in ds.failures[:20]:
            _LOG.info(f"  {f['error']}")
        if len(ds.failures) > 20:
            _LOG.info(f"  ... and {len(ds.failures) - 20} more (all listed in metrics.json)")
    return ds


class _Context:
    """TensorFlow set-up shared by the runs of one process: devices, precision, strategy.

    On a GPU the global Keras policy becomes mixed_float16 for training; ``close()`` puts it back
    (the pipeline converts in the same process, and conversion must see float32)."""

    def __init__(self, strategy: str, cache_mb: Optional[int] = None):
        from .input_data import cache_budget_mb

        tf, keras = import_tf()
        self.tf, self.keras = tf, keras
        self.verbose = keras_verbosity()  # Keras's own output: 0 quiet, 1 progress bars, 2 a line per epoch
        self.cache_bytes = cache_budget_mb(cache_mb) * 2**20
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        self._previous_policy = keras.mixed_precision.global_policy().name
        if self.gpu:
            keras.mixed_precision.set_global_policy("mixed_float16")
        self.strategy = make_strategy(strategy)
        self.device = describe_device() + (f", strategy {strategy} ({self.strategy.num_replicas_in_sync} replicas)"
                                           if strategy != "default" else "")

    def close(self) -> None:
        self.keras.mixed_precision.set_global_policy(self._previous_policy)

    @staticmethod
    def feature_mode(recipe: Recipe) -> bool:
        """Base frozen and no augmentation in the head phase: the base's output is fixed, so compute it once."""
        return recipe.augmentation_in("head") is None and not recipe.from_scratch

    def build(self, recipe: Recipe, num_classes: int):
        from .model import build_model

        self.keras.utils.set_random_seed(recipe.seed)
        with self.strategy.scope():
            return build_model(recipe, num_classes)


def _predict_features(ctx, built, paths, prep, batch_size):
    from .input_data import image_dataset

    ds = image_dataset(paths, None, prep, batch_size, cache=None)
    return np.asarray(built.features.predict(ds, verbose=1 if ctx.verbose == 1 else 0), dtype=np.float32)


@dataclass
class _Splits:
    """One assignment of the data set: indices, labels and paths per split, and the decoded-image cache."""

    names: list
    prep: Preprocessing
    index: dict
    y: dict
    paths: dict
    decoded: dict = field(default_factory=dict)
    cache_left: int = 0              # bytes of the memory budget not yet given to a split
    cache_dir: Optional[Path] = None
    cached_in: dict = field(default_factory=dict)  # split -> "memory" or "disk"
    shuffle_size: Optional[int] = None              # the training shuffle buffer, images
    targets: Optional[np.ndarray] = None            # soft training targets (distillation), else None
    teacher: Optional[dict] = None                  # the teacher's record for metrics.json

    @classmethod
    def of(cls, ds: Dataset, assignment: np.ndarray, recipe: Recipe, cache_bytes: int = 0,
           cache_dir: Optional[Path] = None) -> "_Splits":
        from .input_data import image_bytes, shuffle_buffer

        index = {s: np.flatnonzero(assignment == s) for s in ("train", "val", "test")}
        for s, idx in index.items():
            if len(idx) == 0:
                raise ConfigError(f"the {s} split is empty ({len(ds)} images); use more data or other fractions")
        prep = preprocessing_for(recipe)
        n = len(index["train"])
        train_on_disk = cache_dir is not None and n * image_bytes(prep) > cache_bytes  # train is placed first
        shuffle = shuffle_buffer(n, prep, train_on_disk, cache_bytes)
        if shuffle < n:
            # the shuffle buffer holds part of the split: put the files in a random order once, so
            # the buffer's window is not one class (the folders list them class by class)
            index["train"] = np.random.default_rng(recipe.seed).permutation(index["train"])
        return cls(list(ds.class_names), prep, index,
                   {s: ds.labels[idx] for s, idx in index.items()},
                   {s: [ds.paths[i] for i in idx] for s, idx in index.items()},
                   cache_left=cache_bytes, cache_dir=cache_dir, shuffle_size=shuffle)

    def images(self, s: str):
        """Decoded uint8 images of split ``s``, cached, shared by all phases: in memory while the
        budget lasts (train first), else in a tf.data file cache under ``cache_dir``."""
        from .input_data import decode_dataset, image_bytes

        if s not in self.decoded:
            need = len(self.paths[s]) * image_bytes(self.prep)
            if need <= self.cache_left or self.cache_dir is None:
                self.cache_left -= need
                self.cached_in[s] = "memory"
                self.decoded[s] = decode_dataset(self.paths[s], self.prep).cache()
            else:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                self.cached_in[s] = "disk"
                self.decoded[s] = decode_dataset(self.paths[s], self.prep).cache(str(self.cache_dir / s))
        return self.decoded[s]

    def counts(self) -> dict:
        return {s: {n: int((self.y[s] == c).sum()) for c, n in enumerate(self.names)} for s in self.index}

    def fit_labels(self):
        """(train, val) labels for ``fit``: class indices, or with soft targets the targets and
        one-hot validation labels (the validation loss stays the loss against the true labels)."""
        if self.targets is None:
            return self.y["train"], self.y["val"]
        return self.targets, np.eye(len(self.names), dtype=np.float32)[self.y["val"]]


def _fit_and_report(recipe: Recipe, ds: Dataset, assignment: np.ndarray, out: Path, ctx: _Context,
                    features: Optional[np.ndarray] = None, learning_floor: bool = True,
                    teacher: Optional[str] = None) -> dict:
    """Train on ``assignment``'s train split, choose the threshold on val, evaluate on test, write everything."""
    t_start = time.perf_counter()
    image_cache = out / IMAGE_CACHE
    shutil.rmtree(image_cache, ignore_errors=True)  # a killed run's partial cache is not reusable
    sp = _Splits.of(ds, assignment, recipe, ctx.cache_bytes, image_cache)
    try:
        return _fit_and_report_splits(recipe, ds, assignment, out, ctx, sp, features, learning_floor, t_start, teacher)
    finally:
        shutil.rmtree(image_cache, ignore_errors=True)


def _fit_and_report_splits(recipe: Recipe, ds: Dataset, assignment: np.ndarray, out: Path, ctx: _Context,
                           sp: "_Splits", features: Optional[np.ndarray], learning_floor: bool, t_start: float,
                           teacher: Optional[str] = None) -> dict:
    positive = (resolve_label(recipe.positive_label, sp.names) if recipe.target_recall
                else _soft_label(recipe.positive_label, sp.names))
    built = ctx.build(recipe, len(sp.names))
    state = ck.TrainState.load(out / CHECKPOINTS)
    if recipe.distills:
        _ask_teacher(recipe, ds, assignment, sp, state, teacher)
    if ctx.feature_mode(recipe) and features is None:
        features = _cached_features(ctx, built, ds, sp.prep, recipe.batch_size, state)
    _train_phases(recipe, built, sp, state, ctx, features)
    probs = {s: _predict(recipe, built, sp, s, features, ctx) for s in ("val", "test")}
    threshold = _choose_threshold(recipe, positive, sp, probs["val"])
    evaluation = _evaluate(sp, probs, positive, threshold)
    seconds = time.perf_counter() - t_start  # this process only; a resumed run adds its earlier epochs below
    spec = ModelSpec(
        labels=tuple(sp.names), preprocessing=sp.prep, output="probabilities", positive_label=positive,
        threshold=threshold, recipe=recipe.name, variant=None, training_fingerprint=fingerprint(ds, assignment),
        versions={"tensorflow": ctx.tf.__version__, "keras": ctx.keras.__version__, "lungedge": package_version()},
        extra={"alpha": recipe.alpha, "split": recipe.split, "weights": recipe.weights},
        intended=intended_for(recipe.modality, sp.names))
    metrics = _write_run(out, ctx, _Trained(recipe, ds, sp, built, state, spec, probs, evaluation, seconds))
    verdict = evaluation["verdict"]
    _cleanup(state.folder)
    _LOG.info(f"test ({metrics['decision']}):\n{format_report(evaluation['test'])}")
    _LOG.info(verdict.sentence())
    if verdict.failed and learning_floor:
        raise ModelError(f"{verdict.sentence()} (run folder {out} kept for diagnosis)")
    return metrics


def _ask_teacher(recipe: Recipe, ds: Dataset, assignment: np.ndarray, sp: _Splits, state, teacher: Optional[str]) -> None:
    """The soft training targets from the teacher's answers (``train.distill``), into ``sp``."""
    from .distill import TEACHER_PROBS, soft_targets, teacher_note, teacher_probabilities

    if teacher is None and not state.path(TEACHER_PROBS).is_file():
        raise ConfigError(f"recipe {recipe.name!r} distils from a run of {recipe.teacher!r}: give it with --teacher RUN "
                          f"(`lungedge train --recipe {recipe.teacher} --data DIR --out RUN` trains one), or train "
                          f"without it with --set distill=0")
    asked = teacher_probabilities(Path(teacher or "."), recipe, ds, assignment, sp.paths["train"], state.folder)
    sp.targets = soft_targets(sp.y["train"], asked["probs"], recipe.distill, recipe.distill_temperature)
    sp.teacher = teacher_note(asked["info"], sp.y["train"], asked["probs"])
    _LOG.info(f"distilling from {sp.teacher['run']} (weight {recipe.distill}, temperature {recipe.distill_temperature}; "
              f"the teacher agrees with {sp.teacher['train_agreement']:.1%} of the training labels)")


def _cached_features(ctx, built, ds: Dataset, prep, batch_size: int, state) -> np.ndarray:
    """The frozen base's features of every image, computed once and kept for --resume."""
    cache = state.path("features.npy")
    if cache.is_file():
        return np.load(cache)
    _LOG.info(f"base frozen, no augmentation: computing base features once for {len(ds)} images")
    features = _predict_features(ctx, built, ds.paths, prep, batch_size)
    state.folder.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


def _phases(recipe: Recipe) -> list:
    """(name, epochs, learning rate, schedule) of each training phase."""
    phases = [("head", recipe.epochs, recipe.learning_rate, recipe.lr_schedule)]
    if recipe.fine_tune.enabled:
        phases.append(("fine_tune", recipe.fine_tune.epochs, recipe.fine_tune.learning_rate, recipe.fine_tune.lr_schedule))
    return phases


def _train_phases(recipe: Recipe, built, sp: _Splits, state, ctx: _Context, features) -> None:
    """Every phase in order, resumable: skip finished phases, continue an interrupted one."""
    from .model import unfreeze_top

    cw = class_weights(sp.y["train"], len(sp.names)) if recipe.class_weights else None
    if cw:
        _LOG.info("class weights: " + ", ".join(f"{sp.names[i]} {w:.3f}" for i, w in cw.items()))
    offset = 0
    for phase, epochs, lr, schedule in _phases(recipe):
        if phase not in state.done:
            if phase == "fine_tune":
                unfreeze_top(built.base, recipe.fine_tune.blocks)
            on_features = ctx.feature_mode(recipe) and phase == "head"
            _fit_phase(recipe, built, sp, state, ctx, features if on_features else None, cw,
                       (phase, epochs, lr, schedule), offset)
        offset += sum(1 for r in state.history if r["phase"] == phase)


def _fit_phase(recipe: Recipe, built, sp: _Splits, state, ctx: _Context, features, cw, phase_settings, offset) -> None:
    """One phase: compile, restore what a previous process left, fit with the checkpoint callback,
    restore the best weights, mark the phase done."""
    from .input_data import image_dataset
    from .model import compile_model, ema_momentum

    phase, epochs, lr, schedule = phase_settings
    fit_model = built.head if features is not None else built.model
    steps_per_epoch = -(-len(sp.index["train"]) // recipe.batch_size)
    ema = ema_momentum(recipe.fine_tune.ema_epochs, steps_per_epoch) if phase == "fine_tune" else 0.0
    with ctx.strategy.scope():
        compile_model(fit_model, lr, schedule, epochs * steps_per_epoch, recipe.label_smoothing, ema,
                      soft_targets=sp.targets is not None)
    if state.done:  # a later phase starts from the end of the previous one
        _load_weights(built.model, state.path(f"phase_{state.done[-1]}.weights.h5"))
    start = state.start_phase(phase)
    ok = False  # the optimizer's variables (and so a weight average) restored from the checkpoint
    if start > 0:
        _load_weights(fit_model, state.path(ck.LAST_WEIGHTS))
        ok = ck.load_optimizer(fit_model.optimizer, fit_model.trainable_variables, state.path(ck.LAST_OPTIMIZER))
        _LOG.info(f"resuming phase {phase} after epoch {start}" + ("" if ok else " (optimizer state not restored)"))
    patience = recipe.patience if (phase != "fine_tune" or recipe.fine_tune.early_stopping) else 0
    if not state.stopped and start < epochs:
        callback = ck.make_callback(state, built.model, recipe.monitor, patience, offset)
        n_trainable = sum(int(np.prod(v.shape)) for v in fit_model.trainable_variables)
        _LOG.info(f"phase {phase}: up to {epochs} epochs at lr {lr}, {n_trainable:,} trainable parameters"
                  + (" (head on cached base features)" if features is not None else "")
                  + (f"; keeps the moving average of the weights (momentum {ema:.4f})" if ema else ""))
        common = dict(epochs=epochs, initial_epoch=start, class_weight=cw, callbacks=[callback], verbose=ctx.verbose)
        y_train, y_val = sp.fit_labels()
        if features is not None:
            fit_model.fit(features[sp.index["train"]], y_train, batch_size=recipe.batch_size, shuffle=True,
                          validation_data=(features[sp.index["val"]], y_val), **common)
        else:
            train_ds = image_dataset(sp.paths["train"], y_train, sp.prep, recipe.batch_size, training=True,
                                     shuffle_size=sp.shuffle_size,
                                     augment=recipe.augmentation_in(phase), seed=recipe.seed + len(state.history),
                                     decoded=sp.images("train"))
            val_ds = image_dataset(sp.paths["val"], y_val, sp.prep, recipe.batch_size, decoded=sp.images("val"))
            fit_model.fit(train_ds, validation_data=val_ds, shuffle=False, **common)
    elif ema and ok:  # every epoch ran in an earlier process: apply its restored average, as fit would have
        fit_model.optimizer.finalize_variable_values(fit_model.trainable_variables)
    elif ema and start > 0:  # no average to apply (it was not restored): never overwrite with a blank one
        _LOG.info(f"phase {phase}: the weight average was not restored; the last epoch's weights are kept")
    if patience and state.path(ck.BEST_WEIGHTS).is_file():
        _load_weights(built.model, state.path(ck.BEST_WEIGHTS))
        _LOG.info(f"restored the best weights ({recipe.monitor} {state.best:.4f})")
    ck.save_weights_atomic(built.model, state.path(f"phase_{phase}.weights.h5"))
    state.finish_phase()


def _predict(recipe: Recipe, built, sp: _Splits, s: str, features, ctx: _Context) -> np.ndarray:
    """Probabilities on split ``s``: from cached features when the base was never trained."""
    from .input_data import image_dataset

    if ctx.feature_mode(recipe) and not recipe.fine_tune.enabled:
        return np.asarray(built.head.predict(features[sp.index[s]], batch_size=256, verbose=0), dtype=np.float64)
    data = image_dataset(sp.paths[s], None, sp.prep, recipe.batch_size, decoded=sp.images(s))
    return np.asarray(built.model.predict(data, verbose=0), dtype=np.float64)


def _choose_threshold(recipe: Recipe, positive, sp: _Splits, p_val: np.ndarray) -> Optional[Threshold]:
    """The operating point on the validation split (``edge_runtime.operating_point``), if the recipe asks."""
    if not (recipe.target_recall and positive):
        return None
    value = operating_point(p_val, sp.y["val"], sp.names.index(positive), recipe.target_recall, recipe.threshold_rule)
    _LOG.info(f"threshold: {positive} when p >= {value:.4f} (validation recall >= {recipe.target_recall}, "
              f"rule {recipe.threshold_rule})")
    return Threshold(positive, value, recipe.target_recall, "validation", recipe.threshold_rule)


def _evaluate(sp: _Splits, probs: dict, positive, threshold: Optional[Threshold]) -> dict:
    """Test metrics with the decision rule and with argmax, validation metrics, the learning floor."""
    pos_index = sp.names.index(positive) if positive else None
    value = threshold.value if threshold else None
    test_pred = apply_threshold(probs["test"], pos_index, value)
    return {
        "test": classification_metrics(sp.y["test"], test_pred, sp.names, probs["test"]),
        "argmax": classification_metrics(sp.y["test"], probs["test"].argmax(1), sp.names, probs["test"]),
        "validation": classification_metrics(sp.y["val"], apply_threshold(probs["val"], pos_index, value),
                                              sp.names, probs["val"]),
        "verdict": floor.judge(sp.y["test"], test_pred, sp.names),
    }


@dataclass
class _Trained:
    """A finished training: what the run folder is written from."""

    recipe: Recipe
    ds: Dataset
    sp: _Splits
    built: object
    state: object
    spec: ModelSpec
    probs: dict
    evaluation: dict
    seconds: float  # this process's training time


def _write_run(out: Path, ctx: _Context, t: _Trained) -> dict:
    """Model, spec, recipe, history, plots, metrics and model card: the run-folder contract."""
    from .run_report import model_card, plot_confusion, plot_history, plot_roc, write_history

    recipe, built, spec, sp, probs, evaluation, state, ds, seconds = (
        t.recipe, t.built, t.spec, t.sp, t.probs, t.evaluation, t.state, t.ds, t.seconds)
    th, verdict = spec.threshold, evaluation["verdict"]
    _write_model(built.model, out / MODEL)
    atomic_write_text(str(out / SPEC), spec.to_json())
    atomic_write_text(str(out / RECIPE), recipe.to_json())
    write_history(out / HISTORY, state.history)
    plots = out / PLOTS
    plots.mkdir(exist_ok=True)
    plot_history(plots / "training_curves.png", state.history, f"{recipe.name}: training",
                 restored_epoch=_restored_epoch(state.history, recipe))
    plot_confusion(plots / "confusion_matrix.png", evaluation["test"]["confusion_matrix"], sp.names,
                   f"{recipe.name}: test ({'threshold' if th else 'argmax'})")
    plot_roc(plots / "roc.png", sp.y["test"], probs["test"], sp.names, f"{recipe.name}: test ROC")
    metrics = dict(evaluation["test"])
    metrics.update({
        "split": "test", "decision": "threshold" if th else "argmax", "threshold": th.to_dict() if th else None,
        "argmax": evaluation["argmax"], "validation": evaluation["validation"], "counts": sp.counts(),
        "failures": ds.failures, "epochs_run": len(state.history), "train_seconds": round(seconds, 1),
        "epoch_seconds_total": round(state.seconds, 1), "device": ctx.device,
        "image_cache": {"budget_mb": ctx.cache_bytes // 2**20, "splits": dict(sp.cached_in),
                        "shuffle_buffer": sp.shuffle_size},
        "recipe": recipe.name, "data": str(Path(ds.root).resolve()), "learning_floor": verdict.to_dict(),
        "teacher": sp.teacher,
    })
    atomic_write_text(str(out / METRICS), json.dumps(metrics, indent=2))
    card = model_card(recipe, spec, sp.counts(), evaluation["test"], evaluation["argmax"], evaluation["validation"],
                      str(ds.root), ds.failures, seconds, ctx.device,
                      fixed_test=ds.fixed_split is not None, verdict=verdict)
    atomic_write_text(str(out / CARD), card)
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
    """The trained model, uncompiled: no optimizer state and no training loss, so plain
    ``keras.models.load_model`` opens it without the project's custom loss (label smoothing)."""
    plain = model.__class__.from_config(model.get_config())  # keras.models.clone_model would compile it again
    plain.set_weights(model.get_weights())
    tmp = path.with_name(f".{path.stem}-tmp{os.getpid()}.keras")
    plain.save(str(tmp))
    os.replace(tmp, path)


def _cleanup(folder: Path) -> None:
    """Remove the checkpoints of a finished run (the model is saved; they only serve --resume)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
