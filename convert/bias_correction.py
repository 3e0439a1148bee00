"""Empirical bias correction of the final layer for integer variants.

Full-integer quantisation of a MobileNetV2 classifier shifts its logits systematically (on the
X-ray model measured here: every flipped decision went the same way), because small rounding
errors through the base add up in the same direction and the head magnifies them. The
correction measures, on the calibration images (training images, never test), the mean
difference between the Keras model's logits and the quantised model's logits, moves the
final Dense layer's bias by that amount and converts again (Nagel et al. 2019, "bias
correction", applied to the last layer). A softmax ignores a shift common to all classes, so
the per-class offsets are centred.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from edge_runtime.errors import ModelError


def final_dense(model):
    """The Dense layer whose output the model's final softmax reads (a Dense with a softmax
    activation, or a linear Dense followed by a softmax Activation), looking inside a nested
    head model (``Sequential`` or functional) that ends the model; None when there is none."""
    found = _pre_dense_chain(model)
    return found[0] if found else None


def _pre_dense_chain(model):
    """(final Dense layer, list of models that map the input to that layer's input)."""
    import keras

    layer = model.layers[-1] if getattr(model, "layers", None) else None
    if layer is None:
        return None
    if type(layer).__name__ == "Dense":
        if _activation(layer) == "softmax" and getattr(layer, "use_bias", False):
            return layer, [keras.Model(model.inputs, layer.input)]
        return None
    if _is_softmax(layer) and len(model.layers) >= 2:
        dense = model.layers[-2]  # Dense(linear) -> Activation("softmax")
        if (type(dense).__name__ == "Dense" and _activation(dense) == "linear"
                and getattr(dense, "use_bias", False)
                and (isinstance(model, keras.Sequential) or layer.input is dense.output)):
            return dense, [keras.Model(model.inputs, dense.input)]
        return None
    if isinstance(layer, keras.Model):
        inner = _pre_dense_chain(layer)
        if inner:
            return inner[0], [keras.Model(model.inputs, layer.input)] + inner[1]
    return None


def _activation(layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _is_softmax(layer) -> bool:
    name = type(layer).__name__
    return name == "Softmax" or (name == "Activation" and _activation(layer) == "softmax")


def keras_logits(model, dense, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Pre-softmax outputs of the Keras model: features into the final Dense layer, times W, plus b."""
    found = _pre_dense_chain(model)
    if not found or found[0] is not dense:
        raise ModelError("bias correction: cannot find the model's final softmax Dense layer")
    feats = x
    for part in found[1]:
        feats = part.predict(feats, batch_size=batch_size, verbose=0)
    w, b = dense.get_weights()
    return np.asarray(feats, np.float64) @ w.astype(np.float64) + b.astype(np.float64)


def tflite_logits(tflite: bytes, x: np.ndarray) -> np.ndarray:
    """Dequantised input of the final SOFTMAX op of a converted model, per image.

    Raises:
        ModelError: the graph has no SOFTMAX op or its input cannot be read.
    """
    from ai_edge_litert.interpreter import Interpreter

    import warnings

    with warnings.catch_warnings():  # "for debugging purposes only": here it is the point
        warnings.simplefilter("ignore")
        it = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    ops = [op for op in it._get_ops_details() if op.get("op_name") == "SOFTMAX"]
    if not ops:
        raise ModelError("bias correction: the converted model has no SOFTMAX op")
    logit_index = int(ops[-1]["inputs"][0])
    detail = next(t for t in it.get_tensor_details() if t["index"] == logit_index)
    scale, zero = detail.get("quantization", (0.0, 0))
    inp = it.get_input_details()[0]
    in_scale, in_zero = inp.get("quantization", (0.0, 0))
    rows = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        if np.dtype(inp["dtype"]) != np.float32:
            info = np.iinfo(inp["dtype"])
            xi = np.clip(np.rint(xi / in_scale + in_zero), info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], xi)
        it.invoke()
        z = it.get_tensor(logit_index)[0].astype(np.float64)
        rows.append((z - zero) * scale if scale else z)
    return np.asarray(rows)


def correct_and_convert(model, convert: Callable[[], bytes], calibration: np.ndarray,
                        rounds: int = 1, tolerance: float = 0.02) -> Tuple[bytes, Optional[dict]]:
    """Convert, measure the logit offset on ``calibration``, fix the bias, convert again.

    Args:
        model: the Keras model (its final bias is changed during the call and restored after).
        convert: converts ``model`` as it currently is to TFLite bytes.
        calibration: preprocessed training images.
        rounds: at most this many corrections.
        tolerance: stop when every centred offset is below this (in logits).

    Returns:
        (bytes of the last conversion, a record of the correction or None when the model's
        last layer is not a softmax Dense layer and nothing was done).
    """
    dense = final_dense(model)
    data = convert()
    if dense is None or calibration is None or len(calibration) == 0:
        return data, None
    w, b0 = dense.get_weights()
    target = keras_logits(model, dense, calibration)
    history = []
    conversions = 1
    bias = b0.astype(np.float64).copy()
    try:
        for round_ in range(rounds + 1):
            offset = (target - tflite_logits(data, calibration)).mean(axis=0)
            offset -= offset.mean()
            history.append([float(v) for v in offset])
            if np.max(np.abs(offset)) < tolerance or round_ == rounds:
                break
            bias = bias + offset
            dense.set_weights([w, bias.astype(b0.dtype)])
            data = convert()
            conversions += 1
    finally:
        dense.set_weights([w, b0])
    record = {"layer": dense.name, "images": int(len(calibration)), "offsets_per_round": history,
              "bias_change": [float(v) for v in (bias - b0)], "conversions": conversions,
              "residual_offset": history[-1]}
    return data, record
