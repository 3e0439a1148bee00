"""The domain score inside every converted file: how unlike the training images an input is.

Chosen by measurement (docs/DOMAIN.md): the Mahalanobis distance of an image's features to the
nearest class mean of the training images, with one shared covariance shrunk by Ledoit-Wolf,

    score(x) = min_c (f(x) - m_c)' P (f(x) - m_c) / D

where ``f`` is the global average of MobileNetV2's ``block_16_project_BN`` output (320 values
for alpha 1.0: the last block's projection, before the 1x1 expansion to 1280), concatenated
with the global average of earlier blocks' outputs where the recipe lists them
(``Recipe.domain_layers``: a small model's last block alone tells CT slices from X-rays less
well, an early block sees the low-level difference), ``m_c`` the class means, ``P`` the shrunk precision and ``D`` the feature count, so that an image like the
training images scores about 1. Softmax confidence cannot do this (AUROC 0.06-0.18 against the
other modality); the empirical covariance collapses with a few hundred images per D dimensions;
the top principal components lose what separates outliers; the pooled 1280-d output features
catch rotated and inverted images less well and cost 16 times the weights.

In the graph, ``f W`` with ``W`` the Cholesky factor of ``P`` (``P = W W'``) is one
fully-connected op per layer (its rows of ``W``; the sum of their outputs, so that each layer's
features keep their own int8 scale), D x D weights in all (102,400 for D = 320: 0.1 MB in an
int8 file), then the
squared distance to each class's ``m_c W`` and the minimum: a second output, ``domain_score``,
computed in the same invoke as the classes, in every variant.

The statistics are fitted on the run's training images *other than* the integer variants'
calibration images, so that calibration sees scores as unseen images have them (an int8 output
cannot represent scores beyond its calibrated range: the unseen in-domain images must fit
inside it with room above their threshold). The acceptance threshold is chosen per file on its
own scores of the validation split (``convert.conversion``).

TensorFlow and scikit-learn are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from lungedge.edge_runtime.domain import METHOD, METHOD_VERSION, SCORE_OUTPUT

#: The layer whose pooled output is scored, when the base is a MobileNetV2.
MOBILENET_LAYER = "block_16_project_BN"
#: Between layer names in the file's record (``DomainGate.layer``).
LAYER_SEPARATOR = "+"
#: At most this many training images fit the statistics (stratified); more changes little.
MAX_FIT_IMAGES = 3000


@dataclass(frozen=True)
class DomainFit:
    """The fitted statistics: class means (C, D), whitening ``W`` (D, D) with ``W W'`` the shrunk
    precision, and what they were fitted on."""

    means: np.ndarray
    whiten: np.ndarray
    layers: Tuple[str, ...]
    shrinkage: float
    images: int
    #: each layer's feature count, in ``layers`` order (rows of ``whiten``)
    widths: Tuple[int, ...] = ()
    #: the score an anchor row of the graph always has (``anchored``): the integer variants'
    #: calibrated output range reaches it, so out-of-domain images score up to it (0: no anchor)
    ceiling: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.whiten.shape[0])

    @property
    def layer(self) -> str:
        """The scored layers as one name, as the file's record has it."""
        return LAYER_SEPARATOR.join(self.layers)

    def whiten_rows(self) -> Tuple[np.ndarray, ...]:
        """``whiten``'s rows for each layer's features, in ``layers`` order."""
        widths = self.widths or (self.dim,)
        return tuple(np.split(self.whiten, np.cumsum(widths)[:-1], axis=0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The score of each feature row (N, D), in float64: the reference the files approximate."""
        z = np.asarray(features, np.float64) @ self.whiten
        centres = self.means @ self.whiten
        d = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
        return d.min(axis=1) / self.dim

    def record(self) -> dict:
        return {"method": METHOD, "version": METHOD_VERSION, "layer": self.layer, "dimension": self.dim,
                "pooling": "global average", "covariance": "shared, Ledoit-Wolf shrinkage",
                "shrinkage": round(float(self.shrinkage), 6), "classes": int(self.means.shape[0]),
                "fit_images": int(self.images), "output": SCORE_OUTPUT, "anchor": round(float(self.ceiling), 4)}

    def anchored(self, reference_scores: np.ndarray, factor: float = 4.0) -> "DomainFit":
        """This fit with its anchor at ``factor`` times the 99th percentile of ``reference_scores``
        (unseen in-domain images, scored in float)."""
        import dataclasses

        p99 = float(np.percentile(np.asarray(reference_scores, np.float64), 99))
        return dataclasses.replace(self, ceiling=factor * p99)


def _base_and_pool(model):
    """(base, pooling layer) of a base -> global average pooling -> head classifier, else None."""
    from .heatmap_signature import head_layers

    parts = head_layers(model)
    return None if parts is None else parts[:2]


def feature_layers(base, wanted: Sequence[str] = (MOBILENET_LAYER,)) -> Tuple[str, ...]:
    """The base's layers to score: those of ``wanted`` it has (a MobileNetV2 has them all), else
    its output layer."""
    names = {layer.name for layer in base.layers}
    found = tuple(name for name in wanted if name in names)
    return found or (base.layers[-1].name,)


def _pooled(base, image, layers: Sequence[str], with_output: bool = False):
    """Global averages of ``layers``' outputs on the Keras tensor ``image`` (and the base's own
    output when ``with_output``): one run of the base."""
    import keras

    outputs = [base.get_layer(name).output for name in layers] + ([base.output] if with_output else [])
    inner = keras.Model(base.inputs, outputs, name="base_with_domain_layers")(image, training=False)
    inner = list(inner) if isinstance(inner, (list, tuple)) else [inner]
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"domain_pool_{k}")(t) for k, t in enumerate(inner[:len(layers)])]
    return pooled, (inner[-1] if with_output else None)


def feature_model(model, layers: Sequence[str] = (MOBILENET_LAYER,)):
    """Keras model image -> the pooled features of the scored layers, concatenated, or None for a
    model that is not base -> pooling -> head (such a file converts without a domain score)."""
    import keras

    parts = _base_and_pool(model)
    if parts is None:
        return None
    base = parts[0]
    image = keras.Input(tuple(model.input.shape[1:]), name="image")
    pooled, _ = _pooled(base, image, feature_layers(base, layers))
    features = keras.layers.Concatenate(name="domain_features_concat")(pooled) if len(pooled) > 1 else pooled[0]
    return keras.Model(image, features, name="domain_features")


def layer_widths(model, layers: Sequence[str]) -> Tuple[int, ...]:
    """The channel count of each of ``layers`` in ``model``'s base."""
    base = _base_and_pool(model)[0]
    return tuple(int(base.get_layer(name).output.shape[-1]) for name in layers)


def extract(features_model, images, batch: int = 32, desc: str = "domain features") -> np.ndarray:
    """Pooled features of ``images`` (an array or ``NormalizedImages``), in batches."""
    from lungedge.edge_runtime.progress import bar

    out = []
    with bar(total=len(images), desc=desc) as progress_bar:
        for i in range(0, len(images), batch):
            x = np.asarray(images[i : i + batch], np.float32)
            out.append(np.asarray(features_model(x, training=False), np.float64))
            progress_bar.update(len(x))
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit(features: np.ndarray, labels: Sequence[int], classes: int, layers: Union[str, Sequence[str]],
        widths: Sequence[int] = ()) -> DomainFit:
    """Class means and the Ledoit-Wolf shared covariance of ``features`` (N, D) by class.

    ``layers`` names the layers whose pooled outputs ``features`` concatenates, ``widths`` their
    feature counts (needed with more than one layer). A class without images gets no mean (the
    score is the distance to the classes seen).

    Raises:
        ValueError: fewer than 2 images, or no class with images.
    """
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    widths = tuple(int(w) for w in widths)
    if len(layers) > 1 and (len(widths) != len(layers) or sum(widths) != f.shape[1]):
        raise ValueError(f"{len(layers)} layers need their widths summing to {f.shape[1]}, got {widths}")
    if len(f) < 2:
        raise ValueError(f"the domain score needs at least 2 training images, got {len(f)}")
    means, centred = [], []
    for c in range(classes):
        fc = f[y == c]
        if len(fc):
            m = fc.mean(axis=0)
            means.append(m)
            centred.append(fc - m)
    if not means:
        raise ValueError("no class has training images")
    lw = LedoitWolf(assume_centered=True).fit(np.concatenate(centred))
    precision = np.linalg.inv(lw.covariance_)
    precision = (precision + precision.T) / 2
    whiten = np.linalg.cholesky(precision)  # precision = W W'
    return DomainFit(np.asarray(means), whiten, layers, float(lw.shrinkage_), int(len(f)), widths=widths)


def gated_model(model, domain: DomainFit):
    """The Keras model image -> [model's output, domain_score (N, 1)], sharing ``model``'s layers,
    or None when ``model`` is not base -> pooling -> head."""
    import keras

    parts = _base_and_pool(model)
    if parts is None:
        return None
    image = keras.Input(tuple(model.input.shape[1:]), name="image")
    features, score = base_with_score(parts[0], image, domain)
    return keras.Model(image, [_rest_of_model(model, features), score], name=f"{model.name}_domain")


def base_with_score(base, image, domain: DomainFit):
    """(base's output, domain_score (N, 1)) on the Keras tensor ``image``: the base runs once."""
    import keras
    from keras import ops

    pooled, features = _pooled(base, image, domain.layers, with_output=True)
    # 1/D folded into the whitening, so the squared distances are already the score; one
    # fully-connected op per layer, summed: each layer's features keep their own int8 scale
    scale = 1.0 / np.sqrt(domain.dim)
    parts = []
    for k, (rows, x) in enumerate(zip(domain.whiten_rows(), pooled)):
        whiten = keras.layers.Dense(domain.dim, use_bias=False, name=f"domain_whiten_{k}", trainable=False)
        whiten.build((None, rows.shape[0]))
        whiten.set_weights([(rows * scale).astype(np.float32)])
        parts.append(whiten(x))
    z = keras.layers.Add(name="domain_whitened")(parts) if len(parts) > 1 else parts[0]
    w = domain.whiten * scale
    centres = domain.means @ w
    classes = len(centres)
    if domain.ceiling > 0:  # an anchor row at distance ~ceiling from every in-domain image
        anchor = centres[:1] + np.sqrt(domain.ceiling / domain.dim)
        centres = np.concatenate([centres, anchor])
    # each centre's squared distance as SUB, MUL and a FULLY_CONNECTED of ones (the sum): in an int8
    # file TFLite Micro's kernels for these give LiteRT's numbers exactly, where SQUARED_DIFFERENCE
    # and SUM differed by up to 117 output steps (measured on the micro X-ray file)
    total = keras.layers.Dense(1, use_bias=False, name="domain_sum", trainable=False)
    total.build((None, domain.dim))
    total.set_weights([np.ones((domain.dim, 1), np.float32)])
    parts = []
    for c, centre in enumerate(centres.astype(np.float32)):
        diff = ops.subtract(z, ops.convert_to_tensor(centre[None, :]))
        parts.append(total(ops.multiply(diff, diff)))
    d = ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    # the minimum over the real classes: concatenation, slice and min keep one quantisation (whose
    # calibrated range the anchor column extends up to the ceiling)
    score = ops.min(d[:, :classes], axis=-1, keepdims=True)
    return features, keras.layers.Identity(name=SCORE_OUTPUT)(score)


def _rest_of_model(model, features):
    """``model``'s layers after its base, applied to the base's output ``features``."""
    import keras

    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    x = features
    for layer in layers[1:]:
        x = layer(x)
    return x


#: Calibration images kept out of the fit: enough that the integer output's calibrated range
#: reaches past the unseen images' 99th percentile, few enough that small classes stay in the fit.
HOLDOUT_MIN, HOLDOUT_SHARE = 100, 0.15


def split_for_fit(n_train: int, calibration_picked: Optional[Sequence[int]], seed: int = 0) -> np.ndarray:
    """Indices of the training images that fit the statistics: all but a holdout of the
    calibration images (``HOLDOUT_MIN`` or ``HOLDOUT_SHARE`` of the training images, whichever
    is more, at most all of them), at most ``MAX_FIT_IMAGES`` (a random pick fixed by ``seed``).

    The held-out calibration images score as unseen images do, so the integer variants'
    calibrated output range covers the validation images' scores with room above the threshold;
    without a holdout every calibration image is a fitted one, whose scores are lower, and the
    threshold would sit at the output's ceiling.
    """
    rng = np.random.default_rng(seed)
    picked = np.asarray(sorted(set(int(i) for i in (calibration_picked or ()))), dtype=np.int64)
    count = min(len(picked), max(HOLDOUT_MIN, int(round(HOLDOUT_SHARE * n_train))))
    held = set(rng.choice(picked, count, replace=False).tolist()) if count else set()
    idx = np.asarray([i for i in range(n_train) if i not in held], dtype=np.int64)
    if len(idx) > MAX_FIT_IMAGES:
        idx = np.sort(rng.choice(idx, MAX_FIT_IMAGES, replace=False))
    return idx


def classes_first(data: bytes) -> bytes:
    """The converted file with its class output first and ``domain_score`` second, in the graph
    and in the default signature (named ``probabilities`` and ``domain_score``): readers that take
    output 0 (MediaPipe's first head, most apps) get the classes. No TensorFlow."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from lungedge.edge_runtime.metadata import _TFLITE_IDENTIFIER, _sharing_builder

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = model.subgraphs[0]
    outs = list(graph.outputs)
    if len(outs) != 2:
        return data
    scores = [t for t in outs if list(graph.tensors[t].shape) == [1, 1]]
    if len(scores) != 1:
        return data
    score = scores[0]
    classes = next(t for t in outs if t != score)
    graph.outputs = [classes, score]
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            for tm in sig.outputs or []:
                tm.name = SCORE_OUTPUT if tm.tensorIndex == score else "probabilities"
            sig.outputs = sorted(sig.outputs or [], key=lambda tm: tm.tensorIndex == score)
    builder = _sharing_builder(flatbuffers)(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    return bytes(builder.Output())
