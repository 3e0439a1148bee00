"""Convert one Keras classifier to one TFLite variant, with the lungedge record embedded.

TensorFlow is imported inside the functions, never at module import.
"""

from __future__ import annotations


import hashlib
import weakref

import os
from typing import Any, Optional, Union

import numpy as np

from lungedge.edge_runtime.errors import ConfigError, ModelError, first_line
from lungedge.edge_runtime.metadata import embed_spec
from lungedge.edge_runtime.spec import ModelSpec
from lungedge.edge_runtime.version import package_version

from lungedge.train.tfimport import import_tf
from lungedge.train.tfimport import load_keras_model as _load_file
from lungedge.train.tfimport import quiet as _quiet

from .variants import Variant, get_variant

ModelLike = Union[str, "os.PathLike[str]", Any]


def load_keras_model(model_or_path: ModelLike):
    """A Keras model object from a model or a ``.keras`` / ``.h5`` path.

    Raises:
        ModelError: the file is missing or not a loadable Keras model.
    """
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path
    return _load_file(model_or_path)


def model_sha256(model_or_path: ModelLike) -> str:
    """sha256 of a model file's bytes, or of a model object's weights (in order)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        h = hashlib.sha256()
        with open(model_or_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h = hashlib.sha256()
    for w in model_or_path.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def check_classifier(model, spec: ModelSpec) -> None:
    """Refuse a model that is not an image classifier matching ``spec``.

    One image input (H, W, C) as the spec's preprocessing says, one output (classes,) with
    one column per label; for ``output == "probabilities"`` the outputs on a sample must be
    a probability distribution (a softmax head).

    Raises:
        ModelError: with one line saying what does not match.
    """
    inputs, outputs = list(model.inputs), list(model.outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"not an image classifier: expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
    in_shape = tuple(inputs[0].shape)[1:]
    out_shape = tuple(outputs[0].shape)[1:]
    p = spec.preprocessing
    if in_shape != (p.height, p.width, p.channels):
        raise ModelError(f"not a classifier for this spec: model input {in_shape}, spec says "
                         f"{(p.height, p.width, p.channels)}")
    if len(out_shape) != 1 or out_shape[0] != spec.num_classes:
        raise ModelError(f"not a classifier for this spec: model output {out_shape}, spec has "
                         f"{spec.num_classes} labels {list(spec.labels)}")
    if spec.output == "probabilities":
        rng = np.random.default_rng(0)
        sample = rng.uniform(-1, 1, (2,) + in_shape).astype(np.float32)
        y = np.asarray(model(sample, training=False))
        if not (np.all(y >= -1e-6) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3)):
            raise ModelError("not a classifier: its outputs are not probabilities (no softmax at the end?); "
                             "set the spec's output to 'logits' if that is intended")


def centred_logits_model(model):
    """``model`` without its final softmax, its last Dense layer centred (the mean over classes
    subtracted from its weights and bias, which softmax ignores), or None when the model does not
    end in Dense -> softmax (a softmax activation layer, or a Dense layer with softmax activation),
    at the top level or at the end of a nested Sequential head.

    An integer variant quantises its output tensor to 256 levels: as probabilities, every confident
    image lands on the same top level and the ranking (AUC) among them is lost; as logits the levels
    span the evidence, and the device applies the softmax in float. Centred, two-class logits are
    +-half the log-odds, which lets readers of the standard record get the same probabilities from
    a per-class sigmoid (``edge_runtime.metadata.score_calibration_text``). The layers before the
    last are shared with ``model``.
    """
    from .heatmap_signature import activation_name, is_softmax

    _, keras = import_tf()
    last = model.layers[-1]
    if isinstance(last, keras.Sequential):  # a nested head: rebuild it from its layers
        chain = [l for l in last.layers if not isinstance(l, keras.layers.InputLayer)]
        if len(chain) >= 2 and is_softmax(chain[-1]) and isinstance(chain[-2], keras.layers.Dense) \
                and activation_name(chain[-2]) == "linear":
            dense, prefix = chain[-2], chain[:-2]
        elif isinstance(chain[-1], keras.layers.Dense) and activation_name(chain[-1]) == "softmax":
            dense, prefix = chain[-1], chain[:-1]
        else:
            return None
        x = last.input
        for layer in prefix:
            x = layer(x)
    elif is_softmax(last):  # Dense -> Activation("softmax") at the top level
        producer = getattr(last.input, "_keras_history", None)
        dense = producer[0] if producer else None
        if not isinstance(dense, keras.layers.Dense) or activation_name(dense) != "linear":
            return None
        x = dense.input
    elif isinstance(last, keras.layers.Dense) and activation_name(last) == "softmax":
        dense, x = last, last.input
    else:
        return None
    weights = dense.get_weights()
    kernel = weights[0] - weights[0].mean(axis=1, keepdims=True)
    centred = keras.layers.Dense(dense.units, name="centred_logits", use_bias=dense.use_bias, dtype="float32")
    centred.build((None, kernel.shape[0]))
    centred.set_weights([kernel] + ([weights[1] - weights[1].mean()] if dense.use_bias else []))
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one input stays a tensor, not a list
    return keras.Model(inputs, centred(x), name=f"{model.name}_logits")


#: model -> its centred-logits model: one per model, so that every conversion of it (the integer
#: variants and their float32 reference for the bias correction) has the same tensor names
_LOGITS_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def integer_source(model, spec: ModelSpec):
    """(Keras model, spec) that the integer variants are converted from: the centred-logits model
    and ``output="logits"`` for a softmax classifier (``centred_logits_model``), else as given."""
    if spec.output != "probabilities":
        return model, spec
    if model not in _LOGITS_MODELS:
        _LOGITS_MODELS[model] = centred_logits_model(model)
    logits = _LOGITS_MODELS[model]
    if logits is None:
        return model, spec
    return logits, spec.replace(output="logits")


def converter_versions() -> dict:
    """Versions recorded in every converted file."""
    tf, keras = import_tf()
    out = {"tensorflow": tf.__version__, "keras": keras.__version__, "lungedge": package_version(),
           "converter": f"tf.lite.TFLiteConverter.from_keras_model (tensorflow {tf.__version__})"}
    try:
        from importlib.metadata import version

        out["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # the metadata writer needs it, but the record should not fail on it
        pass
    return out


def _float_images(images):
    """Calibration images as the converter reads them: ``NormalizedImages`` as they are (normalised
    one image at a time), anything else as a float32 array."""
    from .calibration import NormalizedImages

    return images if isinstance(images, NormalizedImages) else np.asarray(images, np.float32)


def _representative(calibration: np.ndarray):
    def gen():
        for i in range(len(calibration)):
            yield [calibration[i : i + 1]]

    return gen


def tflite_bytes(model, variant: Variant, calibration: Optional[np.ndarray] = None, heatmap: bool = False,
                 domain=None) -> bytes:
    """Run the TFLite converter for ``variant`` (no metadata).

    With ``heatmap`` a classifier whose head ``convert.heatmap_signature`` recognises gets a second
    signature, ``heatmap``, that also returns its class activation maps; the default signature
    (subgraph 0) stays image -> probabilities. Off by default: a file with two subgraphs is
    refused by MediaPipe's ImageClassifier ("assumed to have a single subgraph").

    Raises:
        ConfigError: an integer variant without calibration images.
        ModelError: the converter failed (its first line is quoted).
    """
    tf, _ = import_tf()
    if variant.calibrated and (calibration is None or len(calibration) == 0):
        raise ConfigError(f"variant {variant.name!r} needs calibration images, got none")
    if heatmap:
        from .heatmap_signature import heatmap_model, split_heatmap

        two_outputs = heatmap_model(model, domain)
        if two_outputs is not None:
            return split_heatmap(tflite_bytes(two_outputs, variant, calibration, heatmap=False))
    if domain is not None:
        from .domain import classes_first, gated_model

        gated = gated_model(model, domain)
        if gated is not None:
            return classes_first(tflite_bytes(gated, variant, calibration))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant.optimize:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant.float16_weights:
        conv.target_spec.supported_types = [tf.float16]
    if variant.calibrated:
        conv.representative_dataset = _representative(_float_images(calibration))
    if variant.integer_only:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if variant.io_dtype in ("int8", "uint8"):
        conv.inference_input_type = getattr(tf, variant.io_dtype)
        conv.inference_output_type = getattr(tf, variant.io_dtype)
    try:
        # Keras' export path prints every captured tensor, and the converter logs each pass:
        # keep the console readable (errors still arrive as the exception below).
        with _quiet():
            if variant.float_stem_ops:
                return _selective(tf, conv, model, variant, calibration)
            return bytes(conv.convert())
    except Exception as exc:
        raise ModelError(f"TFLite conversion to {variant.name} failed: {first_line(exc, 300)}") from None


#: calibration images of the conversion that only names the stem ops of a mixed variant
NAMING_IMAGES = 4


def _selective(tf, conv, model, variant: Variant, calibration: np.ndarray) -> bytes:
    """Quantise all but the first ``variant.float_stem_ops`` compute ops (left in float).

    The ops are found by converting once fully and reading the output tensor names of the
    first compute ops; the debugger's denylist then keeps them in float. That first conversion
    only names the ops, so it calibrates on a few images (the names do not depend on them).
    """
    from ai_edge_litert.interpreter import Interpreter

    conv.representative_dataset = _representative(np.asarray(calibration[:NAMING_IMAGES], np.float32))
    full = conv.convert()
    it = Interpreter(model_content=full)
    ops = [op for op in it._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    nodes = [it._get_tensor_details(op["outputs"][0], 0)["name"] for op in ops[: variant.float_stem_ops]]
    again = tf.lite.TFLiteConverter.from_keras_model(model)
    again.optimizations = [tf.lite.Optimize.DEFAULT]
    again.representative_dataset = _representative(_float_images(calibration))
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=again, debug_dataset=_representative(np.asarray(calibration[:1], np.float32)),
        debug_options=options)
    return bytes(debugger.get_nondebug_quantized_model())


def variant_spec(spec: ModelSpec, variant: Variant, source_sha256: Optional[str],
                 versions: Optional[dict] = None, extra: Optional[dict] = None) -> ModelSpec:
    """The record for one converted file: the training spec plus variant, versions, source hash."""
    merged_versions = dict(spec.versions or {})
    merged_versions.update(versions if versions is not None else converter_versions())
    merged_extra = dict(spec.extra or {})
    merged_extra["conversion"] = {"variant": variant.to_dict(), **(extra or {})}
    return spec.replace(variant=variant.name, versions=merged_versions,
                        source_model_sha256=source_sha256, extra=merged_extra)


def convert_keras_model(model_or_path: ModelLike, spec: ModelSpec, variant: Union[str, Variant],
                        calibration: Optional[np.ndarray] = None, source_sha256: Optional[str] = None,
                        extra: Optional[dict] = None, bias_correction: bool = True,
                        reference: Optional[bytes] = None, heatmap: bool = False,
                        domain=None) -> bytes:
    """Convert any Keras classifier to one TFLite variant with the lungedge record inside.

    Args:
        model_or_path: a Keras model or a ``.keras`` / ``.h5`` file.
        spec: the model's record (labels, preprocessing, threshold...); the variant,
            versions and source hash are filled in here.
        variant: a name from ``VARIANTS`` or a ``Variant``.
        calibration: float32 array (N, H, W, C) of preprocessed real images, needed by the
            integer variants (see ``convert.calibration``).
        source_sha256: hash of the source model (default: of the file, or of the weights).
        extra: more facts for ``spec.extra["conversion"]`` (e.g. calibration count).
        bias_correction: for the integer variants, correct each conv / fully connected op's
            int32 bias, in graph order, so its mean output on the calibration images matches
            the float32 model's (``convert.bias_correction``); recorded in the metadata.
        reference: the float32 ``.tflite`` of the model the integer variants are converted from
            (``integer_source``) for the bias correction (default: converted here); pass it when
            converting several integer variants of one model (with the same ``heatmap`` setting).
        heatmap: add the ``heatmap`` signature (class activation maps on the device); such a file
            has two subgraphs, which MediaPipe's ImageClassifier refuses.
        domain: a ``convert.domain.DomainFit``: the file gets a second output, ``domain_score``
            (its acceptance threshold is chosen afterwards on the file's own scores:
            ``convert.conversion``); pass the same fit with ``reference``.

    The integer variants of a softmax classifier output centred logits (``integer_source``;
    the record says ``output: logits`` and ``conversion.logits: centred``): the device applies the
    softmax in float, so the quantised output keeps the float model's ranking.

    Returns:
        The ``.tflite`` file's bytes; the record is checked to read back.

    Raises:
        ConfigError: unknown variant, or no calibration for an integer variant.
        ModelError: not a classifier matching ``spec``, or the converter failed.
    """
    v = get_variant(variant)
    model = load_keras_model(model_or_path)
    check_classifier(model, spec)
    calibration = _checked_calibration(calibration, spec)
    sha = source_sha256 or model_sha256(model_or_path)
    extra = dict(extra or {})
    if v.calibrated:
        extra.setdefault("calibration_images", int(len(calibration)) if calibration is not None else 0)
        source, source_spec = integer_source(model, spec)
        if source is not model:
            model, spec = source, source_spec
            extra["logits"] = "centred"
    data = tflite_bytes(model, v, calibration, heatmap=heatmap, domain=domain)
    if v.io_dtype == "uint8":
        data = pin_uint8_input(data, spec)
    if v.calibrated and bias_correction:
        if reference is None:
            reference = tflite_bytes(model, get_variant("float32"), heatmap=heatmap, domain=domain)
        data, extra["bias_correction"] = _bias_corrected(data, reference, calibration)
    if v.io_dtype == "uint8":
        spec = raw_pixel_spec(spec, data)
    return embed_spec(data, variant_spec(spec, v, sha, extra=extra))


def _checked_calibration(calibration, spec: ModelSpec) -> Optional[np.ndarray]:
    """The calibration images as float32 (N, H, W, C) of the spec's input size, or None.

    Raises:
        ConfigError: another shape.
    """
    if calibration is None:
        return None
    calibration = _float_images(calibration)
    p = spec.preprocessing
    if calibration.ndim != 4 or calibration.shape[1:] != (p.height, p.width, p.channels):
        raise ConfigError(f"calibration must be an array (N, {p.height}, {p.width}, {p.channels}), "
                          f"got shape {calibration.shape}")
    return calibration


def _bias_corrected(data: bytes, reference: bytes, calibration) -> tuple:
    """(the integer file with its biases corrected, the record for its metadata)."""
    from .bias_correction import correct_biases

    data, record = correct_biases(data, reference, calibration)
    return data, record or "not applied: no integer conv or fully connected op"


def pin_uint8_input(data: bytes, spec: ModelSpec) -> bytes:
    """Set a uint8 input's quantisation to the spec's normalisation: scale ``1/std``, zero point
    ``mean`` rounded (127.5/127.5 gives 1/127.5 and 128).

    The converter takes the input's range from the calibration images, which need not reach
    pixels 0 and 255 (16 X-rays gave -1.0..0.94): raw pixels through that range would be
    stretched by a few per cent. The input's only reader is the QUANTIZE op to the int8
    inside, which requantises from whatever the input says, so pinning it changes nothing
    else; values beyond the calibrated range are clipped there as in the int8 variant.

    Raises:
        ModelError: the input is not a uint8 tensor read only by QUANTIZE ops, or the spec has
            per-channel normalisation.
    """
    from ai_edge_litert import schema_py_generated as schema

    p = spec.preprocessing
    if len(set(p.mean)) != 1 or len(set(p.std)) != 1:
        raise ModelError(f"a uint8 input needs one mean and std for all channels, got {p.mean} / {p.std}")
    buf = bytearray(data)
    model = schema.Model.GetRootAs(buf, 0)
    graph = model.Subgraphs(0)
    t_index = graph.Inputs(0)
    tensor = graph.Tensors(t_index)
    q = tensor.Quantization()
    if tensor.Type() != schema.TensorType.UINT8 or q is None or q.ScaleLength() != 1 or q.ZeroPointLength() != 1:
        raise ModelError("expected a uint8 input with one scale and zero point")
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    readers = [codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength())
               if t_index in graph.Operators(i).InputsAsNumpy().tolist()]
    if not readers or any(c != schema.BuiltinOperator.QUANTIZE for c in readers):
        raise ModelError("expected the uint8 input to be read only by QUANTIZE ops")
    q.ScaleAsNumpy()[0] = np.float32(1.0 / p.std[0])  # views into ``buf``
    q.ZeroPointAsNumpy()[0] = int(np.floor(p.mean[0] + 0.5))
    return bytes(buf)


def raw_pixel_spec(spec: ModelSpec, data: bytes) -> ModelSpec:
    """``spec`` with the normalisation a uint8 input implements: ``mean`` its zero point and
    ``std`` one over its scale, so that the input value is the pixel value itself.

    MediaPipe Tasks and the TFLite Task Library feed a uint8 input raw pixels (they ignore
    ``NormalizationOptions`` for it); with this record lungedge feeds the same values, and the
    record says what the file really computes. The difference from the float model's own
    normalisation (127.5/127.5) is under one input step.

    Raises:
        ModelError: the input is not a quantised uint8 tensor.
    """
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=bytes(data)).get_input_details()[0]
    scale, zero = details["quantization"]
    if np.dtype(details["dtype"]) != np.uint8 or not scale > 0:
        raise ModelError(f"expected a quantised uint8 input, got {np.dtype(details['dtype']).name} "
                         f"(scale {scale}, zero point {zero})")
    p = spec.preprocessing
    pre = type(p)(**{**p.to_dict(), "mean": (float(zero),), "std": (1.0 / float(scale),)})
    return spec.replace(preprocessing=pre)


def write_tflite(path: Union[str, "os.PathLike[str]"], data: bytes) -> None:
    """Write a model atomically (temp file + rename): a failure leaves no partial file."""
    from lungedge.edge_runtime.atomic_write import atomic_write_bytes

    atomic_write_bytes(str(path), data)
