"""MobileNetV2 transfer-learning model: frozen base, small head, optional fine-tuning of the top blocks.

The model takes the float input made by ``edge_runtime.preprocess`` (no preprocessing layer
inside) and outputs softmax probabilities over the classes (also for two classes).
"""

from __future__ import annotations

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


def build_model(recipe: Recipe, num_classes: int, mixed_precision: bool = False) -> Built:
    """Build the classifier for ``recipe`` with ``num_classes`` outputs, base frozen.

    Raises:
        ConfigError: the weights cannot be found (see ``train.weights``).
    """
    import keras

    size, channels = recipe.image_size, (3 if recipe.color_mode == "rgb" else 1)
    weights = resolve_weights(recipe.weights, recipe.alpha, size)
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, channels), alpha=recipe.alpha, include_top=False, weights=weights)
    base.trainable = False
    inputs = keras.Input((size, size, channels), name="image")
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


def compile_model(model, learning_rate: float) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
