"""tf.data input pipeline over the shared preprocessing (TensorFlow imported here; import lazily).

Decoding and resizing run in parallel through ``edge_runtime.preprocess.load_pixels`` (the
device's own function, via ``tf.numpy_function``); the uint8 images are cached (in memory or in a
file), then shuffled, batched, augmented (Keras preprocessing layers, training split only),
normalised exactly as ``edge_runtime.preprocess.normalize`` does and prefetched, so that the
model, not the input, is the bottleneck.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.preprocess import load_pixels
from lungedge.edge_runtime.spec import Preprocessing

from .recipes import Augment


#: Memory for decoded training images (MB). Splits that fit are cached in memory, in the order
#: train, val, test; the rest on disk (tf.data file cache in the run folder, removed at the end).
#: 2 GB holds 13,900 images at 224x224 RGB. Overridden by ``--cache-mb`` or LUNGEDGE_CACHE_MB.
DEFAULT_CACHE_MB = 2048
#: The training shuffle buffer: the whole split up to 10,000 images when the split is cached in
#: memory (as before the budget existed); when it is cached on disk, an eighth of the budget and
#: at least 1,000 images, so memory stays flat however large the data set.
MAX_SHUFFLE = 10000
MIN_DISK_SHUFFLE = 1000


def cache_budget_mb(value: Optional[int] = None) -> int:
    """The decoded-image cache budget: ``value``, else LUNGEDGE_CACHE_MB, else ``DEFAULT_CACHE_MB``."""
    if value is None:
        raw = os.environ.get("LUNGEDGE_CACHE_MB", "").strip()
        if not raw:
            return DEFAULT_CACHE_MB
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"LUNGEDGE_CACHE_MB must be a whole number of MB, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"the image cache budget must be 0 MB or more, got {value}")
    return value


def image_bytes(prep: Preprocessing) -> int:
    return prep.height * prep.width * prep.channels


def shuffle_buffer(n: int, prep: Preprocessing, on_disk: bool = False, cache_bytes: int = 0) -> int:
    """Images in the training shuffle buffer (see ``MAX_SHUFFLE``)."""
    if not on_disk:
        return max(1, min(n, MAX_SHUFFLE))
    return max(1, min(n, MAX_SHUFFLE, max(MIN_DISK_SHUFFLE, cache_bytes // 8 // image_bytes(prep))))


def decode_dataset(paths: Sequence[str], prep: Preprocessing):
    """A dataset of uint8 images (H, W, C), decoded in parallel, in the order of ``paths``."""
    import tensorflow as tf

    def _load(p):
        return load_pixels(p.decode("utf-8") if isinstance(p, bytes) else str(p), prep)

    shape = (prep.height, prep.width, prep.channels)

    def _map(p):
        img = tf.numpy_function(_load, [p], tf.uint8, stateful=False)
        img.set_shape(shape)
        return img

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(list(paths), dtype=object).astype(str))
    return ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def normalize_tf(images, prep: Preprocessing):
    """``(pixels - mean) * (1/std)`` in float32: the same operations as ``edge_runtime.preprocess.normalize``."""
    import tensorflow as tf

    mean = tf.constant(np.asarray(prep.mean, dtype=np.float32))
    inv_std = tf.constant(np.float32(1.0) / np.asarray(prep.std, dtype=np.float32))
    return (tf.cast(images, tf.float32) - mean) * inv_std


def build_augmenter(aug: Augment, seed: int):
    """Keras preprocessing layers for radiographs, applied to float pixels in 0..255."""
    import keras

    layers = []
    if aug.rotation > 0:
        layers.append(keras.layers.RandomRotation(aug.rotation / 360.0, fill_mode="constant", seed=seed))
    if aug.shift > 0:
        layers.append(keras.layers.RandomTranslation(aug.shift, aug.shift, fill_mode="constant", seed=seed + 1))
    if aug.zoom > 0:
        layers.append(keras.layers.RandomZoom(aug.zoom, aug.zoom, fill_mode="constant", seed=seed + 2))
    if aug.brightness > 0:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0.0, 255.0), seed=seed + 3))
    if aug.contrast > 0:
        layers.append(keras.layers.RandomContrast(aug.contrast, value_range=(0.0, 255.0), seed=seed + 4))
    if aug.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
    if aug.crop > 0:  # at least (1 - crop) of each side, resized back: RandomZoom's zoom-in only
        layers.append(keras.layers.RandomZoom((-aug.crop, 0.0), None, fill_mode="constant", seed=seed + 6))
    if aug.blur > 0:
        layers.append(keras.layers.RandomGaussianBlur(factor=1.0, kernel_size=max(3, 2 * int(np.ceil(2 * aug.blur)) + 1),
                                                      sigma=(0.0, aug.blur), value_range=(0.0, 255.0), seed=seed + 7))
    return keras.Sequential(layers, name="augment") if layers else None


def intensity_jitter(x, aug: Augment, seed: int):
    """Per-image gamma and Gaussian noise (``Augment.gamma``, ``Augment.noise``) on float pixels
    (B, H, W, C) in 0..255, clipped to that range."""
    import tensorflow as tf

    batch = tf.shape(x)[0]
    if aug.gamma > 0:
        g = tf.exp(tf.random.uniform((batch, 1, 1, 1), -aug.gamma, aug.gamma, seed=seed + 8))
        x = 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, g)
    if aug.noise > 0:
        sd = tf.random.uniform((batch, 1, 1, 1), 0.0, aug.noise * 255.0, seed=seed + 9)
        x = x + sd * tf.random.normal(tf.shape(x), seed=seed + 10)
    return tf.clip_by_value(x, 0.0, 255.0)


def image_dataset(
    paths: Sequence[str],
    labels: Optional[np.ndarray],
    prep: Preprocessing,
    batch_size: int,
    *,
    training: bool = False,
    augment: Optional[Augment] = None,
    seed: int = 0,
    cache: str = "",
    decoded=None,
    shuffle_size: Optional[int] = None,
):
    """Batched (images, labels) or images-only dataset for fit/predict.

    Args:
        paths: image files (already checked readable).
        labels: integer labels, target vectors (images x classes, soft targets), or None for an
            images-only dataset.
        prep: the model's preprocessing.
        batch_size: batch size.
        training: shuffle each epoch and apply ``augment``.
        augment: augmentation parameters (training only), or None.
        seed: shuffle/augmentation seed.
        cache: "" caches decoded images in memory, a path caches them in files, None disables.
        decoded: an already decoded (and cached) uint8 dataset to reuse instead of ``paths``.
        shuffle_size: the training shuffle buffer in images (default ``shuffle_buffer(len(paths))``).
    """
    import tensorflow as tf

    images = decoded if decoded is not None else decode_dataset(paths, prep)
    if decoded is None and cache is not None:
        images = images.cache(cache)
    if labels is not None:  # class indices, or target vectors (one row per image) for soft targets
        labels = np.asarray(labels)
        labels = labels.astype(np.float32 if labels.ndim == 2 else np.int64)
    ds = images if labels is None else tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(labels)))
    if training:
        ds = ds.shuffle(shuffle_size or shuffle_buffer(len(paths), prep), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    augmenter = build_augmenter(augment, seed) if (training and augment is not None) else None

    def _prepare(x):
        x = tf.cast(x, tf.float32)
        if augmenter is not None:
            x = tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0)
        if training and augment is not None and (augment.gamma > 0 or augment.noise > 0):
            x = intensity_jitter(x, augment, seed)
        return normalize_tf(x, prep)

    if labels is None:
        ds = ds.map(_prepare, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (_prepare(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

