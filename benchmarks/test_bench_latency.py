"""Latency of the edge runtime: invoke alone, classify of a decoded array, decode+preprocess,
and end to end on real images, per model x backend x threads.

Run: ``pytest benchmarks/ --models 'runs/x/model_*.tflite' --benchmark-json out.json``.
Percentiles (pytest-benchmark gives none) and the run's context go in each benchmark's
``extra_info``, computed from the raw timings with ``edge_runtime.timing``.
"""

from __future__ import annotations

import itertools

import pytest

from lungedge.edge_runtime.preprocess import load_pixels, normalize
from lungedge.edge_runtime.timing import summarize


def _context(benchmark, clf, what: str) -> None:
    info = clf.describe()
    benchmark.group = f"{what}"
    benchmark.extra_info.update({
        "what": what, "model": info["model"], "sha256": info["sha256"], "size_bytes": info["size_bytes"],
        "variant": info["variant"], "backend": info["backend"], "backend_version": info["backend_version"],
        "threads": clf.threads, "delegate_nodes": clf.delegate_nodes(), "input_dtype": info["input_dtype"],
    })


def _percentiles(benchmark) -> None:
    stats = getattr(benchmark, "stats", None)
    data = getattr(getattr(stats, "stats", None), "data", None)
    if data:
        s = summarize([x * 1e3 for x in data]).to_dict(include_raw=False)
        benchmark.extra_info.update({k: s[k] for k in ("p50_ms", "p90_ms", "p99_ms")})


def test_invoke(benchmark, clf, bench_images, bench_settings):
    """``interpreter.invoke()`` alone, with a real preprocessed image already in the input tensor."""
    pre = clf.spec.preprocessing
    probs = clf.predict_proba(normalize(load_pixels(bench_images[0], pre), pre))
    # a uint8 softmax over 1001 classes sums to 0.93 after dequantisation: only a sanity bound
    assert probs.shape == (len(clf.labels),) and 0.8 < float(probs.sum()) < 1.2
    _context(benchmark, clf, "invoke")
    benchmark.pedantic(clf._interpreter.invoke, rounds=bench_settings["rounds"],
                       warmup_rounds=bench_settings["warmup"], iterations=1)
    _percentiles(benchmark)


def test_classify_decoded(benchmark, clf, bench_images, bench_settings):
    """``Classifier.classify`` of an already-decoded uint8 array at the model's size."""
    pixels = load_pixels(bench_images[0], clf.spec.preprocessing)
    _context(benchmark, clf, "classify_decoded")
    pred = benchmark.pedantic(clf.classify, args=(pixels,), rounds=bench_settings["rounds"],
                              warmup_rounds=bench_settings["warmup"], iterations=1)
    assert pred.label in clf.labels
    _percentiles(benchmark)


def test_end_to_end(benchmark, clf, bench_images, bench_settings):
    """``Classifier.classify(path)``: decode + preprocess + invoke + postprocess, cycling over real images."""
    images = itertools.cycle(bench_images)
    _context(benchmark, clf, "end_to_end")
    pred = benchmark.pedantic(lambda: clf.classify(next(images)), rounds=bench_settings["rounds"],
                              warmup_rounds=bench_settings["warmup"], iterations=1)
    assert pred.label in clf.labels
    _percentiles(benchmark)


def test_preprocess(benchmark, model_path, bench_images, bench_settings, classifier_factory):
    """Decode + preprocess alone (the model's input size), cycling over real images."""
    from lungedge.edge_runtime.backend import available_backends

    clf = classifier_factory(model_path, available_backends()[0], 1)
    pre = clf.spec.preprocessing
    images = itertools.cycle(bench_images)
    _context(benchmark, clf, "preprocess")
    x = benchmark.pedantic(lambda: normalize(load_pixels(next(images), pre), pre), rounds=bench_settings["rounds"],
                           warmup_rounds=bench_settings["warmup"], iterations=1)
    assert x.shape == (pre.height, pre.width, pre.channels)
    _percentiles(benchmark)
