"""MobileNetV2 classifier: with ImageNet weights a frozen base, a small head and optional fine-tuning
of the top blocks; without them (``weights="none"``) the whole network trains from scratch.

The model takes the float input made by ``edge_runtime.preprocess`` (no preprocessing layer
inside) and outputs softmax probabilities over the classes (also for two classes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .recipes import Recipe
from .weights import resolve_weights


@dataclass
class Built:
    """The full model and its parts (``head`` is shared, so training it on cached features
    trains the full model's head too)."""

    model: Any
    base: Any
    features: Any  # base + global average pooling: image -> feature vector
    head: Any  # feature vector -> probabilities


#: BatchNorm momentum for a base trained from scratch. Keras's MobileNetV2 uses 0.999, whose moving
#: statistics need thousands of steps to leave their initial values; a scratch run here takes a few
#: hundred steps, so with 0.999 the model validates (inference mode) on statistics it never had.
SCRATCH_BN_MOMENTUM = 0.9


def build_model(recipe: Recipe, num_classes: int) -> Built:
    """Build the classifier for ``recipe`` with ``num_classes`` outputs.

    With pretrained weights the base is frozen and runs in inference mode (BatchNorm included,
    also when its top blocks are fine-tuned later). From scratch (``recipe.from_scratch``) a
    frozen random base could learn nothing, so the whole network trains, BatchNorm in training
    mode with ``SCRATCH_BN_MOMENTUM``.

    Raises:
        ConfigError: the weights cannot be found (see ``train.weights``).
    """
    import keras

    size, channels = recipe.image_size, (3 if recipe.color_mode == "rgb" else 1)
    weights = resolve_weights(recipe.weights, recipe.alpha, size)
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, channels), alpha=recipe.alpha, include_top=False, weights=weights)
    inputs = keras.Input((size, size, channels), name="image")
    if weights is None:
        base.trainable = True
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
        x = base(inputs)
    else:
        base.trainable = False
        x = base(inputs, training=False)  # BatchNorm stays in inference mode, also when fine-tuning
    feats = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    features = keras.Model(inputs, feats, name="features")
    head_layers = []
    if recipe.head_units:
        head_layers.append(keras.layers.Dense(recipe.head_units, activation="relu", name="dense"))
    if recipe.dropout:
        head_layers.append(keras.layers.Dropout(recipe.dropout, name="dropout", seed=recipe.seed))
    head_layers.append(keras.layers.Dense(num_classes, name="logits"))
    head_layers.append(keras.layers.Activation("softmax", dtype="float32", name="probabilities"))
    head = keras.Sequential([keras.Input((int(feats.shape[-1]),), name="features")] + head_layers, name="head")
    outputs = head(feats)
    model = keras.Model(inputs, outputs, name=f"lungedge_{recipe.name.replace('-', '_')}")
    return Built(model, base, features, head)


def unfreeze_top(base, blocks: int) -> int:
    """Make the top ``blocks`` inverted-residual blocks (of 16) and the final 1x1 convolution
    trainable; BatchNorm layers stay frozen. Returns the number of trainable weights tensors."""
    import keras

    base.trainable = True
    first = 17 - blocks  # block_1 .. block_16; "block_0" is the unnamed expanded_conv
    for layer in base.layers:
        name = layer.name
        top = name.startswith("Conv_1") or name == "out_relu"
        if name.startswith("block_"):
            try:
                top = int(name.split("_")[1]) >= first
            except ValueError:
                top = False
        layer.trainable = bool(top) and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.trainable_weights)


def smoothed_loss(label_smoothing: float, **kwargs):
    """The training loss: cross-entropy on integer labels; with ``label_smoothing`` e > 0, Keras's
    categorical cross-entropy against one-hot targets smoothed to (1 - e) * onehot + e / classes
    (Keras's sparse loss has no smoothing option). ``kwargs`` go to the Keras loss (``reduction``)."""
    import keras

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(**kwargs)
    return register_custom_objects()(label_smoothing, **kwargs)


@functools.lru_cache(maxsize=None)
def register_custom_objects():
    """Define and register (with Keras's serialisation registry) the project's custom loss, so a
    saved ``model.keras`` that names it can be loaded; returns its class. Keras is imported here,
    not when this module is."""
    import keras

    @keras.saving.register_keras_serializable(package="lungedge")
    class SmoothedSparseCrossentropy(keras.losses.Loss):
        def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
            super().__init__(name=name, **kwargs)
            self.label_smoothing = float(label_smoothing)

        def call(self, y_true, y_pred):
            classes = keras.ops.shape(y_pred)[-1]
            onehot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), classes)
            return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.label_smoothing)

        def get_config(self):
            return {**super().get_config(), "label_smoothing": self.label_smoothing}

    return SmoothedSparseCrossentropy


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum of a moving average whose time constant is ``ema_epochs`` epochs
    (0: no average)."""
    if ema_epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


def compile_model(model, learning_rate: float, schedule: str = "constant", total_steps: int = 0,
                  label_smoothing: float = 0.0, ema: float = 0.0, soft_targets: bool = False) -> None:
    """Adam at ``learning_rate``; with ``schedule="cosine"`` decayed to 0 over ``total_steps``;
    the loss of ``smoothed_loss``. ``ema`` > 0: Keras's optimizer EMA with that momentum, whose
    average replaces the weights when ``fit`` ends. ``soft_targets``: the labels are target
    vectors (distillation, ``train.distill``): categorical cross-entropy and accuracy."""
    import keras

    lr = learning_rate
    if schedule == "cosine" and total_steps > 0:
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
    optimizer = keras.optimizers.Adam(lr, use_ema=True, ema_momentum=ema) if ema else keras.optimizers.Adam(lr)
    if soft_targets:
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        return
    model.compile(optimizer=optimizer, loss=smoothed_loss(label_smoothing),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
