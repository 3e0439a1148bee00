"""Measure the input pipeline: training images/s with the tf.data pipeline vs. the same model fitted
on in-memory arrays (the upper bound: no decoding at all).

    python experiments/input_throughput.py --data ../shared/data/chest_xray/train --images 512 --epochs 3

The first epoch of each is a warm-up (tracing; for the pipeline also decoding into the cache) and
is not counted; images/s is the median over the remaining epochs. The base is frozen, as in the
paper recipes, so each step is the base's forward pass plus the head's training step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from lungedge.edge_runtime.atomic_write import atomic_write_text
from lungedge.edge_runtime.preprocess import preprocess


def measure(data_dir: str, images: int = 512, epochs: int = 3, recipe_name: str = "xray-pneumonia",
            image_size: int = 224, alpha: float = 1.0, weights: str = "imagenet", batch_size: int = 32,
            augment: bool = False, seed: int = 0, disk_cache: bool = False) -> dict:
    """Images/s of ``fit`` with the pipeline and with in-memory arrays, same model and images.

    ``disk_cache``: the pipeline caches its decoded images in a file (as training does for the
    splits beyond the memory budget) instead of in memory.

    Returns:
        dict with ``pipeline_img_s``, ``arrays_img_s``, ``ratio`` and the set-up.
    """
    import tempfile

    from lungedge.train.input_data import image_dataset
    from lungedge.train.recipes import get_recipe
    from lungedge.train.training import preprocessing_for

    recipe = get_recipe(recipe_name, image_size=image_size, alpha=alpha, weights=weights, batch_size=batch_size,
                        augment=augment, seed=seed)
    prep = preprocessing_for(recipe)
    paths, labels, n_classes = _pick(data_dir, prep, images, seed)
    with tempfile.TemporaryDirectory(prefix="lungedge-throughput-") as tmp:
        pipe_ds = image_dataset(paths, labels, prep, batch_size, training=True, augment=recipe.augmentation, seed=seed,
                                cache=str(Path(tmp) / "images") if disk_cache else "")
        t_pipe = _epoch_seconds(_fresh_model(recipe, n_classes, seed), epochs, pipe_ds, shuffle=False)
    t0 = time.perf_counter()
    x = np.stack([preprocess(p, prep) for p in paths])
    load_s = time.perf_counter() - t0
    t_arr = _epoch_seconds(_fresh_model(recipe, n_classes, seed), epochs, x, labels, batch_size=batch_size,
                           shuffle=True)
    n = len(paths)
    pipe, arr = _images_per_second(n, t_pipe), _images_per_second(n, t_arr)
    return {
        "images": n, "epochs": epochs, "batch_size": batch_size, "image_size": image_size, "alpha": alpha,
        "augment": bool(augment), "cache": "disk" if disk_cache else "memory", "pipeline_epoch_seconds": [round(t, 3) for t in t_pipe],
        "arrays_epoch_seconds": [round(t, 3) for t in t_arr], "arrays_preload_seconds": round(load_s, 2),
        "pipeline_img_s": round(pipe, 2), "arrays_img_s": round(arr, 2), "ratio": round(pipe / arr, 3),
        "note": "first epoch of each is warm-up (not counted); median of the rest",
    }


def _pick(data_dir: str, prep, images: int, seed: int):
    """(paths, labels, number of classes): ``images`` readable files of ``data_dir``, picked with ``seed``."""
    from lungedge.train.dataset import drop_unreadable, load_dataset

    ds = drop_unreadable(load_dataset(data_dir), prep)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ds), size=min(images, len(ds)), replace=False))
    return [ds.paths[i] for i in pick], ds.labels[pick], len(ds.class_names)


def _fresh_model(recipe, n_classes: int, seed: int):
    """The recipe's model, built and compiled from ``seed`` (both measurements start from the same weights)."""
    import keras

    from lungedge.train.model import build_model, compile_model

    keras.utils.set_random_seed(seed)
    built = build_model(recipe, n_classes)
    compile_model(built.model, recipe.learning_rate)
    return built.model


def _epoch_seconds(model, epochs: int, *args, **kw) -> list:
    """Wall-clock seconds of each epoch of ``model.fit(*args, **kw)``."""
    import keras

    times = []

    class _T(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    model.fit(*args, epochs=epochs, verbose=0, callbacks=[_T()], **kw)
    return times


def _images_per_second(n: int, times: list) -> float:
    """``n`` over the median epoch, the first (warm-up) left out when there are more."""
    return n / float(np.median(times[1:] if len(times) > 1 else times))


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", action="store_true", help="augment in the pipeline (the arrays run has none)")
    ap.add_argument("--disk-cache", action="store_true", help="the pipeline caches decoded images on disk")
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    a = ap.parse_args(argv)
    res = measure(a.data, a.images, a.epochs, image_size=a.image_size, alpha=a.alpha, weights=a.weights,
                  batch_size=a.batch_size, augment=a.augment, disk_cache=a.disk_cache)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        atomic_write_text(str(Path(a.out)), text)


if __name__ == "__main__":
    main()
