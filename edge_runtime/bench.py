"""Benchmark TFLite classifiers on this device: the library behind ``lungedge bench``.

Everything is measured through the runtime's own code (``Classifier`` and
``edge_runtime.timing.time_calls``), so a benchmark and a deployed classifier time the same
thing. Each model runs in a fresh Python process (``python -m lungedge.edge_runtime.bench_isolate``), so its
peak RSS is its own and a model that crashes the interpreter cannot take the run down.

Measured per model and thread count:

- ``startup_ms``: interpreter construction and tensor allocation (``Classifier.load_ms``);
- ``first_invoke_ms``: the first ``invoke()`` (XNNPACK packs weights there);
- ``first_classify_ms``: the first real image, end to end, right after loading;
- ``invoke``: ``interpreter.invoke()`` alone, on a real preprocessed image already in place;
- ``classify_decoded``: ``Classifier.classify`` of an already-decoded uint8 array at the
  model's size (normalise + quantise + invoke + postprocess);
- ``preprocess``: decode + preprocess of the image files (``load_pixels`` + ``normalize``);
- ``end_to_end``: ``Classifier.classify(path)``: decode + preprocess + invoke + postprocess;
- ``pipelined_ips``: images/s of ``Classifier.classify_many`` over the same files with its default
  decoding workers (what ``lungedge classify FOLDER`` gets), beside the sequential ``throughput_ips``;

each as raw timings with mean/std/p50/p90/p99, plus throughput, peak RSS, model size and
SHA-256, backend and version, delegate (XNNPACK) node count and, with ``data_dir``, accuracy.
No TensorFlow. The roles are split: this module measures, ``edge_runtime.bench_isolate`` runs a
model in its own process, and the reports (Markdown, PNG, comparisons) are ``lungedge.bench_report``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError, ImageError, InputError, LungedgeError
from .metadata import read_model_bytes
from .settings import RuntimeSettings
from .timing import machine_info, now, peak_rss_mb, time_calls
from .version import package_version

SCHEMA = "lungedge.bench/1"
#: Seconds one model's worker process may take before it is reported as hung.
DEFAULT_TIMEOUT_S = 900


@dataclass(frozen=True)
class BenchSettings:
    """What ``bench`` measures and how, for every model of a run.

    Attributes:
        images: image files or folders for the end-to-end timings; None times a synthetic
            1024x1024 JPEG (decoded from memory) instead. Unreadable images are listed and left out.
        threads: interpreter thread counts, one measurement each.
        runs, warmup: timed and untimed calls per measurement.
        data_dir: a labelled folder (``DATA/<class>/<image>``) to measure accuracy on.
        runtime: the classifier's settings (``backend``; ``labels``, ``mean``, ``std`` for models
            without lungedge metadata: without ``labels`` such a model gets placeholder names
            ``class_0..N-1``, latency does not need names).

    Raises:
        ConfigError: bad ``threads``, ``runs`` or ``warmup``.
    """

    images: Optional[Tuple[str, ...]] = None
    threads: Tuple[int, ...] = (1, 2)
    runs: int = 50
    warmup: int = 5
    data_dir: Optional[str] = None
    runtime: RuntimeSettings = RuntimeSettings()

    def __post_init__(self) -> None:
        threads = self.threads
        if threads and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in threads):
            threads = tuple(int(t) for t in threads)
        _check_settings(threads, self.runs, self.warmup)
        object.__setattr__(self, "threads", tuple(threads))
        if self.images is not None:
            object.__setattr__(self, "images", tuple(str(x) for x in self.images))
        object.__setattr__(self, "data_dir", str(self.data_dir) if self.data_dir else None)

    @classmethod
    def of(cls, settings: Optional["BenchSettings"] = None, **options) -> "BenchSettings":
        """``settings`` (default: the defaults) with ``options`` over it: its own fields, and
        ``RuntimeSettings`` fields (``backend``, ``labels``, ``mean``, ``std``) for ``runtime``."""
        base = settings if settings is not None else cls()
        runtime_names = {f.name for f in dataclasses.fields(RuntimeSettings)} - {f.name for f in dataclasses.fields(cls)}
        runtime = {k: options.pop(k) for k in list(options) if k in runtime_names}
        if runtime:
            options["runtime"] = base.runtime.replace(**runtime)
        return dataclasses.replace(base, **options) if options else base

    @classmethod
    def default(cls, name: str):
        """The default of field ``name``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    def report(self) -> dict:
        """The settings as a report states them (labels and normalisation are per model)."""
        return {"images": list(self.images) if self.images is not None else None, "threads": list(self.threads),
                "runs": self.runs, "warmup": self.warmup, "backend": self.runtime.backend, "data_dir": self.data_dir}

    def to_dict(self) -> dict:
        """JSON for an isolated worker (``from_dict`` reads it back)."""
        labels = self.runtime.labels
        labels = os.fspath(labels) if isinstance(labels, (str, os.PathLike)) else (list(labels) if labels else None)
        return {**self.report(), "labels": labels, "mean": list(self.runtime.mean or ()) or None,
                "std": list(self.runtime.std or ()) or None}

    @classmethod
    def from_dict(cls, d: dict) -> "BenchSettings":
        return cls.of(**d)


# ---- one model, in this process ------------------------------------------------------------
def bench_model(path: str, settings: Optional[BenchSettings] = None, **options) -> dict:
    """Benchmark one model in this process (see the module docstring for what is measured).

    Args:
        path: a ``.tflite`` file.
        settings: what to measure (``BenchSettings``); ``options`` are its fields (and the
            runtime's ``backend``, ``labels``, ``mean``, ``std``) over it.

    Returns:
        A dict with ``status`` "ok" or "error" (and ``error``, a one-line reason); a model
        that fails to load is an ``error`` result, not an exception.

    Raises:
        ConfigError: bad ``runs``, ``warmup`` or ``threads``.
    """
    settings = BenchSettings.of(settings, **options)
    result: dict = {"model": str(path), "name": Path(path).name, "status": "ok", "error": None, "runs": []}
    sources, image_failures = _usable_images(settings.images)
    result["images"] = {
        "source": "synthetic 1024x1024 JPEG" if settings.images is None else list(settings.images),
        "count": len(sources),
        "failures": image_failures,
    }
    try:
        data = read_model_bytes(path)
        result.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        del data
        runtime = settings.runtime.replace(labels=_labels_for(path, settings.runtime))
        for n in settings.threads:
            info, rec = _bench_threads(path, sources, runtime.replace(threads=n), settings.runs, settings.warmup)
            result.update(info)
            result["runs"].append(rec)
        if settings.data_dir:
            result["accuracy"] = _accuracy(path, settings.data_dir, runtime.replace(threads=settings.threads[0]))
    except LungedgeError as exc:
        result.update(status="error", error=str(exc))
    except Exception as exc:  # a backend's RuntimeError mid-run: report it, let other models run
        result.update(status="error", error=f"{type(exc).__name__}: {_one_line(exc)}")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _bench_threads(path, sources, runtime: RuntimeSettings, runs: int, warmup: int) -> tuple:
    """One model at one thread count (``runtime.threads``): ``(model facts, timings)``."""
    from .classifier import Classifier

    t0 = now()
    # the whole path is timed, domain gate included; refused images are answered (and marked) so
    # that every call returns a Prediction
    clf = Classifier(path, runtime.replace(use_threshold=False, allow_out_of_domain=True))
    construct_ms = (now() - t0) * 1e3
    info = clf.describe()
    facts = {k: info[k] for k in ("sha256", "size_bytes", "backend", "backend_version", "input_dtype",
                                  "output_dtype", "input_shape", "variant", "has_metadata", "domain")}
    if not sources:
        raise ImageError("no readable images to time the end-to-end path (see images.failures)")
    t0 = now()
    first = clf.classify(sources[0])
    rec = {"threads": runtime.threads, "startup_ms": clf.load_ms, "construct_ms": construct_ms,
           "first_invoke_ms": clf.first_invoke_ms, "first_classify_ms": (now() - t0) * 1e3,
           "first_label": first.label, "delegate_nodes": clf.delegate_nodes()}
    cycle = _Cycle(sources)
    rec.update(_steady_timings(clf, cycle, runs, warmup))
    rec["throughput_ips"] = 1e3 / rec["end_to_end"]["mean_ms"]
    rec.update(_pipelined(clf, cycle, runs))
    rec["invoke_throughput_ips"] = 1e3 / rec["invoke"]["mean_ms"]
    del clf
    return facts, rec


def _steady_timings(clf, cycle: "_Cycle", runs: int, warmup: int) -> dict:
    """invoke alone, classify of a decoded image, preprocessing, and the whole path from a file."""
    from .preprocess import load_pixels, normalize

    pre = clf.spec.preprocessing
    pixels = load_pixels(cycle.first, pre)
    clf._run(normalize(pixels, pre))  # a real image in the input tensor for the invoke-only timing
    return {
        "invoke": time_calls(clf._interpreter.invoke, runs, warmup).to_dict(),
        "classify_decoded": time_calls(lambda: clf.classify(pixels), runs, warmup).to_dict(),
        "preprocess": time_calls(lambda: normalize(load_pixels(cycle(), pre), pre), runs, warmup).to_dict(),
        "end_to_end": time_calls(lambda: clf.classify(cycle()), runs, warmup).to_dict(),
    }


def _pipelined(clf, cycle: "_Cycle", runs: int) -> dict:
    """The folder path as ``lungedge classify`` runs it: decoding on a worker pool overlapping invoke."""
    from .batch import default_workers
    from .results import Failure

    workers = default_workers()
    batch = [cycle() for _ in range(max(runs, 2 * workers))]
    t0 = now()
    done = sum(1 for r in clf.classify_many(batch, workers=workers) if not isinstance(r, Failure))
    return {"workers": workers, "pipelined_ips": done / (now() - t0) if done else None}


def _accuracy(path, data_dir, runtime: RuntimeSettings) -> dict:
    from .classifier import Classifier
    from .folder_eval import evaluate_classifier

    clf = Classifier(path, runtime)
    try:
        m = evaluate_classifier(clf, data_dir, progress=False, keep_predictions=True)
    except (ConfigError, InputError) as exc:  # no usable folder, or classes that differ: keep the timings
        msg = str(exc)
        return {"data": str(data_dir), "error": msg if len(msg) <= 300 else msg[:297] + "..."}
    return {"data": str(data_dir), "accuracy": m["accuracy"], "n": int(np.sum(m["confusion_matrix"])),
            "failures": len(m["failures"]), "decision": m["decision"],
            "macro_f1": m.get("macro", {}).get("f1"),
            # what always answering the most frequent class would score on these images
            "majority_rate": (float(np.max(np.sum(m["confusion_matrix"], axis=1)) / np.sum(m["confusion_matrix"]))
                              if np.sum(m["confusion_matrix"]) else None),
            # per image, in folder order: the agreement between variants is computed from these
            "predictions": m["predictions"]}


def _labels_for(path, runtime: RuntimeSettings):
    """Labels for the Classifier: the user's, the metadata's (None), or placeholders."""
    if runtime.labels is not None:
        return runtime.labels
    from .metadata import read_model_bytes, read_spec

    if read_spec(read_model_bytes(path)) is not None:
        return None
    from .backend import load_backend

    try:
        it = load_backend(runtime.backend).interpreter_class(model_path=str(path))
        n = int(it.get_output_details()[0]["shape"][-1])
    except Exception:
        return None  # let the Classifier raise its own clear error
    return [f"class_{i}" for i in range(n)]


class _Cycle:
    """Endless round-robin over the benchmark images."""

    def __init__(self, items: Sequence):
        self._items, self._i = list(items), 0
        self.first = self._items[0]

    def __call__(self):
        item = self._items[self._i % len(self._items)]
        self._i += 1
        return item


def _usable_images(images) -> tuple:
    """(sources, failures): readable image paths (or one synthetic JPEG) and bad ones."""
    from .image_files import expand_inputs
    from .readability import unreadable
    from .spec import Preprocessing

    if images is None:
        return [_synthetic_jpeg()], []
    items = expand_inputs([str(x) for x in images])
    failures = {src: problem for src, problem in items if problem}
    candidates = [src for src, problem in items if not problem]
    failures.update(unreadable(candidates, Preprocessing(height=32, width=32, color_mode="rgb")))
    ok = [src for src in candidates if src not in failures]
    return ok, [{"source": src, "error": failures[src]} for src, _ in items if src in failures]


def _synthetic_jpeg(size: int = 1024) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = ((xx + yy) * (255.0 / (2 * size)) + rng.normal(0, 20, (size, size))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _check_settings(threads, runs, warmup) -> None:
    if not threads or any(not isinstance(t, int) or t < 1 for t in threads):
        raise ConfigError(f"threads must be positive integers, got {list(threads) if threads else threads!r}")
    if not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs must be a positive integer, got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---- many models, one subprocess each -------------------------------------------------------
def run_bench(models: Iterable[str], settings: Optional[BenchSettings] = None, *, isolate: bool = True,
              timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = False, **options) -> dict:
    """Benchmark several models and return one report (schema ``lungedge.bench/1``).

    Args:
        models: ``.tflite`` paths.
        settings: what to measure (``BenchSettings``); ``options`` are its fields (and the
            runtime's ``backend``, ``labels``, ``mean``, ``std``) over it.
        isolate: run each model in a fresh ``python -m lungedge.edge_runtime.bench_isolate`` process (own
            peak RSS; a crash becomes an error row). False runs them in this process.
        timeout_s: per-model limit of an isolated run.
        progress: a tqdm bar over the models on stderr.

    Returns:
        ``{"schema", "created", "machine", "load_avg", "settings", "models": [bench_model
        results]}``; each failed model has ``status: "error"`` and its reason.

    Raises:
        ConfigError: no models, or bad settings.
        MissingDependencyError: the backend is not installed.
    """
    models = [str(m) for m in models]
    if not models:
        raise ConfigError("no models given to benchmark")
    settings = BenchSettings.of(settings, **options)
    from .backend import load_backend

    load_backend(settings.runtime.backend)  # a missing backend is a usage error, not N failed models
    load_before = _load_avg()
    results = [_bench_one(m, settings, isolate, timeout_s) for m in _models_shown(models, progress)]
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lungedge_version": package_version(),
        "machine": machine_info(),
        "load_avg": {"before": load_before, "after": _load_avg()},
        "settings": settings.report(),
        "models": results,
    }


def _bench_one(model: str, settings: BenchSettings, isolate: bool, timeout_s: float) -> dict:
    if not isolate:
        return bench_model(model, settings)
    from .bench_isolate import bench_isolated

    return bench_isolated(model, settings.to_dict(), timeout_s)


def _models_shown(models: list, progress: bool) -> Iterable[str]:
    """``models``, under a tqdm bar on stderr with ``progress``."""
    if not progress:
        return models
    from tqdm import tqdm

    return tqdm(models, desc="bench", unit="model")


def _load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
