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

import datetime as _dt
import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import ConfigError, ImageError, InputError, LungedgeError
from .metadata import read_model_bytes
from .timing import machine_info, now, peak_rss_mb, time_calls
from .version import package_version

SCHEMA = "lungedge.bench/1"
#: Seconds one model's worker process may take before it is reported as hung.
DEFAULT_TIMEOUT_S = 900


# ---- one model, in this process ------------------------------------------------------------
def bench_model(
    path: str,
    images: Optional[Sequence[str]] = None,
    threads: Sequence[int] = (1, 2),
    runs: int = 50,
    warmup: int = 5,
    backend: str = "auto",
    data_dir: Optional[str] = None,
    labels=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> dict:
    """Benchmark one model in this process (see the module docstring for what is measured).

    Args:
        path: a ``.tflite`` file.
        images: image files or folders for the end-to-end timings; None times a synthetic
            1024x1024 JPEG (decoded from memory) instead. Unreadable images are listed and
            left out.
        threads: interpreter thread counts, one measurement each.
        runs, warmup: timed and untimed calls per measurement.
        backend: ``auto``, ``litert`` or ``tflite-runtime``.
        data_dir: a labelled folder (``DATA/<class>/<image>``) to measure accuracy on.
        labels, mean, std: for models without lungedge metadata; without ``labels`` such a
            model gets placeholder names ``class_0..N-1`` (latency does not need names).

    Returns:
        A dict with ``status`` "ok" or "error" (and ``error``, a one-line reason); a model
        that fails to load is an ``error`` result, not an exception.

    Raises:
        ConfigError: bad ``runs``, ``warmup`` or ``threads``.
    """
    _check_settings(threads, runs, warmup)
    result: dict = {"model": str(path), "name": Path(path).name, "status": "ok", "error": None, "runs": []}
    sources, image_failures = _usable_images(images)
    result["images"] = {
        "source": "synthetic 1024x1024 JPEG" if images is None else [str(x) for x in images],
        "count": len(sources),
        "failures": image_failures,
    }
    try:
        data = read_model_bytes(path)
        result.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        del data
        for n in threads:
            info, rec = _bench_threads(path, sources, n, runs, warmup, backend, labels, mean, std)
            result.update(info)
            result["runs"].append(rec)
        if data_dir:
            result["accuracy"] = _accuracy(path, data_dir, threads[0], backend, labels, mean, std)
    except LungedgeError as exc:
        result.update(status="error", error=str(exc))
    except Exception as exc:  # a backend's RuntimeError mid-run: report it, let other models run
        result.update(status="error", error=f"{type(exc).__name__}: {_one_line(exc)}")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _bench_threads(path, sources, threads, runs, warmup, backend, labels, mean, std) -> tuple:
    """One model at one thread count: ``(model facts, timings)``."""
    from .classifier import Classifier
    from .preprocess import load_pixels, normalize

    t0 = now()
    # the whole path is timed, domain gate included; refused images are answered (and marked) so
    # that every call returns a Prediction
    clf = Classifier(path, threads=threads, backend=backend, labels=_labels_for(path, backend, labels),
                     mean=mean, std=std, use_threshold=False, allow_out_of_domain=True)
    construct_ms = (now() - t0) * 1e3
    info = clf.describe()
    facts = {k: info[k] for k in ("sha256", "size_bytes", "backend", "backend_version", "input_dtype",
                                  "output_dtype", "input_shape", "variant", "has_metadata", "domain")}
    pre = clf.spec.preprocessing
    if not sources:
        raise ImageError("no readable images to time the end-to-end path (see images.failures)")
    t0 = now()
    first = clf.classify(sources[0])
    first_classify_ms = (now() - t0) * 1e3

    cycle = _Cycle(sources)
    pixels = load_pixels(sources[0], pre)
    x = normalize(pixels, pre)
    clf._run(x)  # a real image in the input tensor for the invoke-only timing
    interpreter = clf._interpreter
    rec = {
        "threads": threads,
        "startup_ms": clf.load_ms,
        "construct_ms": construct_ms,
        "first_invoke_ms": getattr(clf, "first_invoke_ms", None),
        "first_classify_ms": first_classify_ms,
        "first_label": first.label,
        "delegate_nodes": clf.delegate_nodes(),
        "invoke": time_calls(interpreter.invoke, runs, warmup).to_dict(),
        "classify_decoded": time_calls(lambda: clf.classify(pixels), runs, warmup).to_dict(),
        "preprocess": time_calls(lambda: normalize(load_pixels(cycle(), pre), pre), runs, warmup).to_dict(),
        "end_to_end": time_calls(lambda: clf.classify(cycle()), runs, warmup).to_dict(),
    }
    rec["throughput_ips"] = 1e3 / rec["end_to_end"]["mean_ms"]
    # the folder path as `lungedge classify` runs it: decoding on a worker pool overlapping invoke
    from .batch import default_workers
    from .results import Failure

    workers = default_workers()
    batch = [cycle() for _ in range(max(runs, 2 * workers))]
    t0 = now()
    done = sum(1 for r in clf.classify_many(batch, workers=workers) if not isinstance(r, Failure))
    rec["workers"] = workers
    rec["pipelined_ips"] = done / (now() - t0) if done else None
    rec["invoke_throughput_ips"] = 1e3 / rec["invoke"]["mean_ms"]
    del clf, interpreter
    return facts, rec


def _accuracy(path, data_dir, threads, backend, labels, mean, std) -> dict:
    from .classifier import Classifier
    from .folder_eval import evaluate_classifier

    clf = Classifier(path, threads=threads, backend=backend, labels=_labels_for(path, backend, labels),
                     mean=mean, std=std)
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


def _labels_for(path, backend, labels):
    """Labels for the Classifier: the user's, the metadata's (None), or placeholders."""
    if labels is not None:
        return labels
    from .metadata import read_model_bytes, read_spec

    if read_spec(read_model_bytes(path)) is not None:
        return None
    from .backend import load_backend

    try:
        it = load_backend(backend).interpreter_class(model_path=str(path))
        n = int(it.get_output_details()[0]["shape"][-1])
    except Exception:
        return None  # let the Classifier raise its own clear error
    return [f"class_{i}" for i in range(n)]


class _Cycle:
    """Endless round-robin over the benchmark images."""

    def __init__(self, items: Sequence):
        self._items, self._i = list(items), 0

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
def run_bench(
    models: Iterable[str],
    images: Optional[Sequence[str]] = None,
    threads: Sequence[int] = (1, 2),
    runs: int = 50,
    warmup: int = 5,
    backend: str = "auto",
    data_dir: Optional[str] = None,
    labels=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    isolate: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
) -> dict:
    """Benchmark several models and return one report (schema ``lungedge.bench/1``).

    Args:
        models: ``.tflite`` paths.
        isolate: run each model in a fresh ``python -m lungedge.edge_runtime.bench_isolate`` process (own
            peak RSS; a crash becomes an error row). False runs them in this process.
        timeout_s: per-model limit of an isolated run.
        progress: a tqdm bar over the models on stderr.
        Other arguments: see ``bench_model``.

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
    threads = [int(t) for t in threads]
    _check_settings(threads, runs, warmup)
    from .backend import load_backend

    load_backend(backend)  # a missing backend is a usage error, not N failed models
    from .bench_isolate import bench_isolated

    kwargs = dict(images=[str(x) for x in images] if images is not None else None, threads=threads, runs=runs,
                  warmup=warmup, backend=backend, data_dir=str(data_dir) if data_dir else None,
                  labels=labels if labels is None or isinstance(labels, str) else list(labels),
                  mean=list(mean) if mean else None, std=list(std) if std else None)
    load_before = _load_avg()
    results = []
    it = models
    if progress:
        from tqdm import tqdm

        it = tqdm(models, desc="bench", unit="model")
    for m in it:
        results.append(bench_isolated(m, kwargs, timeout_s) if isolate else bench_model(m, **kwargs))
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lungedge_version": package_version(),
        "machine": machine_info(),
        "load_avg": {"before": load_before, "after": _load_avg()},
        "settings": {k: v for k, v in kwargs.items() if k not in ("labels", "mean", "std")},
        "models": results,
    }


def _load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
