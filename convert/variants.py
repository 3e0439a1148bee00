"""Named conversion recipes: how a Keras classifier becomes one TFLite variant.

Each variant is a frozen record of converter settings. An unknown name is refused with the
list of valid ones. No TensorFlow here: the settings are applied in ``convert.keras_convert``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple, Union

from lungedge.edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """Converter settings for one kind of ``.tflite`` file.

    Attributes:
        name: the variant's name (also the file suffix, ``model_<name>.tflite``).
        description: one line for reports and ``--help``.
        optimize: apply ``tf.lite.Optimize.DEFAULT`` (weight quantisation).
        float16_weights: store weights as float16 (``target_spec.supported_types``).
        calibrated: needs a representative dataset (integer activations).
        integer_only: restrict to the int8 builtin op set (fail rather than fall back to float).
        io_dtype: dtype of the model's input and output tensors ("float32", "int8" or "uint8").
            A uint8 input takes raw pixel values (its quantisation is the normalisation), the
            convention of Coral, Model Maker, MediaPipe Tasks and the TFLite Task Library,
            which refuse int8 inputs.
        float_stem_ops: leave this many of the first compute ops (the stem: for MobileNetV2
            the first two inverted-residual blocks) in float; the rest is int8.
            Measured: the first depthwise convolution has the largest quantisation error.
        micro: for a microcontroller: verified in TensorFlow Lite Micro and exported as C sources
            (``convert.micro``) next to the file.
    """

    name: str
    description: str
    optimize: bool = False
    float16_weights: bool = False
    calibrated: bool = False
    integer_only: bool = False
    io_dtype: str = "float32"
    float_stem_ops: int = 0
    micro: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "optimize": self.optimize,
            "float16_weights": self.float16_weights, "calibrated": self.calibrated,
            "integer_only": self.integer_only, "io_dtype": self.io_dtype,
            "float_stem_ops": self.float_stem_ops, "micro": self.micro,
        }


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("float32", "no quantisation (the reference)"),
        Variant("float16", "weights stored as float16, computed in float32", optimize=True, float16_weights=True),
        Variant("dynamic", "int8 weights, float activations (dynamic range quantisation; needs LiteRT: "
                "tflite-runtime 2.14 lacks its FULLY_CONNECTED v12)", optimize=True),
        Variant("int8", "full integer: int8 weights and activations, int8 input and output",
                optimize=True, calibrated=True, integer_only=True, io_dtype="int8"),
        Variant("uint8", "full integer: int8 inside, uint8 input (raw pixels) and output; the integer file "
                "MediaPipe Tasks and the TFLite Task Library load", optimize=True, calibrated=True,
                integer_only=True, io_dtype="uint8"),
        Variant("int8-float-io", "int8 weights and activations inside, float32 input and output",
                optimize=True, calibrated=True, integer_only=True, io_dtype="float32"),
        Variant("int8-mixed", "int8 except the stem (first 6 ops: two conv blocks) in float; float32 input and output",
                optimize=True, calibrated=True, io_dtype="float32", float_stem_ops=6),
        Variant("micro", "full integer for a microcontroller: int8 input and output, run in TensorFlow Lite Micro "
                "against LiteRT and exported as C sources (micro/)", optimize=True, calibrated=True,
                integer_only=True, io_dtype="int8", micro=True),
    )
}

DEFAULT_VARIANTS: Tuple[str, ...] = ("float32", "float16", "int8", "int8-mixed")


def get_variant(name: Union[str, Variant]) -> Variant:
    """The variant called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    if isinstance(name, Variant):
        return name
    key = str(name).strip().lower()
    if key not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def parse_variants(value: Union[str, Iterable[str]]) -> Tuple[Variant, ...]:
    """Variants from a comma-separated string or a list of names, in order, without repeats.

    Raises:
        ConfigError: empty list or an unknown name.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for n in names:
        if isinstance(n, str) and not n.strip():
            continue
        v = get_variant(n)
        if v not in out:
            out.append(v)
    if not out:
        raise ConfigError(f"no variants given (got {value!r}); valid variants: {', '.join(VARIANTS)}")
    return tuple(out)
