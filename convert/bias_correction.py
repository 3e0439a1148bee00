"""Sequential empirical bias correction of an integer TFLite model (integer variants).

Full-integer quantisation of MobileNetV2 shifts what each layer outputs on average: rounding a
3x3 depthwise kernel to int8 does not average out over nine weights, inputs after ReLU6 have
means far from zero, and each layer inherits the shifts of the layers before it. Across 52
layers the shifts add up and move the logits (on the runs here, every flipped decision of the
uncorrected CT model went the same way).

The correction (Nagel et al. 2019, "Data-free quantization through weight equalization and
bias correction", section 4.2, empirical variant; Finkelstein et al. 2019, "Fighting
quantization bias with bias") works on the converted file itself. For each convolution and
fully connected op in graph order it runs the integer model and the float32 model on the same
calibration images (training images, never test), takes the mean difference of the op's
output per channel where neither is clipped by the fused activation or the int8 range, and
subtracts it from the op's int32 bias. Each op is measured after the ones before it have been
corrected, so a shift is fixed where it arises instead of being passed on. Weights, scales and
ops are untouched: the file has the same size and speed.

Footprint: the float outputs are computed once and streamed through a temporary folder (one file
per op, read one image at a time), and the integer model runs with XNNPACK on a measuring copy that
lists every corrected op's output as a graph output; memory holds one op's output of one image, so
it does not grow with the number of images or layers.

Measured (``convert/README.md``): on the ct-lung-cancer run the int8 model's mean probability
difference from Keras on the test and validation images went from 0.056 to 0.010.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from lungedge.edge_runtime.errors import ModelError
from lungedge.edge_runtime.quant import quantize

#: images the correction runs on (taken from the calibration images).
DEFAULT_IMAGES = 64
#: where each fused activation of the schema keeps its input unchanged (float units).
_LINEAR_RANGE = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}


@dataclass
class _Op:
    index: int
    name: str           # the output tensor's name (the same in the float32 file)
    output: int         # tensor index
    bias: int           # tensor index of the int32 bias
    buffer: int         # buffer index of the bias
    activation: int     # schema ActivationFunctionType


def _interpreter(data: bytes, threads: Optional[int] = None):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=bytes(data), num_threads=threads or os.cpu_count() or 1)
    it.allocate_tensors()
    return it


def _with_outputs(data: bytes, tensors: List[int]) -> bytearray:
    """A copy of the model whose main graph also outputs ``tensors``, so the interpreter (with
    XNNPACK, unlike ``experimental_preserve_all_tensors``) keeps them readable. The copy is for
    measuring only (re-packed, it loses the shared-vector packing of the file that ships);
    tensor and buffer indices are unchanged."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytes(data), 0)
    sg = m.subgraphs[0]
    have = [int(t) for t in sg.outputs]
    sg.outputs = np.asarray(have + [t for t in tensors if t not in have], np.int32)
    b = flatbuffers.Builder(len(data) + 4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytearray(b.Output())


class _ReferenceOutputs:
    """The float32 model's output of each op on each image, float16, in one file per op in a
    temporary folder: read back one image at a time, so memory holds one op's output of one image
    (MobileNetV2 224, 64 images: 0.9 GB on disk instead of in memory)."""

    def __init__(self, reference: bytes, names: List[str], x: np.ndarray, folder: str):
        ref = _interpreter(reference)
        by_name = {t["name"]: t["index"] for t in ref.get_tensor_details()}
        by_name[MODEL_OUTPUT] = ref.get_output_details()[0]["index"]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ModelError(f"bias correction: the float32 reference has no tensor {missing[0][:80]!r}")
        del ref
        tensors = [by_name[n] for n in names]
        ref = _interpreter(_with_outputs(reference, tensors))
        self._files = [os.path.join(folder, f"op{k}.f16") for k in range(len(names))]
        self._shapes: List[tuple] = []
        handles = [open(f, "wb") for f in self._files]
        try:
            for i in range(len(x)):
                _feed(ref, x[i:i + 1])
                for k, t in enumerate(tensors):
                    out = ref.get_tensor(t).astype(np.float16)
                    if i == 0:
                        self._shapes.append(out.shape)
                    out.tofile(handles[k])
        except OSError as exc:
            raise ModelError(f"bias correction: cannot write the reference outputs to {folder!r} "
                             f"({exc.strerror or exc}); set TMPDIR to a folder with more room") from None
        finally:
            for h in handles:
                h.close()

    def image(self, k: int, i: int) -> np.ndarray:
        shape = self._shapes[k]
        count = int(np.prod(shape))
        return np.fromfile(self._files[k], np.float16, count=count, offset=i * count * 2).reshape(shape)


#: The key of the model's output in ``_ReferenceOutputs``: an op whose output is the model's output
#: (a logits classifier's last Dense) has the converter's renamed output tensor there, whatever
#: its name in the float32 reference.
MODEL_OUTPUT = "<model output>"


def _reference_names(model, ops) -> List[str]:
    """The reference tensor of each op: its output's name, or ``MODEL_OUTPUT`` for the graph's output,
    directly or through one output adapter (DEQUANTIZE for a float output, QUANTIZE for uint8)."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.Subgraphs(0)
    outputs = set(graph.OutputsAsNumpy().tolist())
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    # the converter's output adapters: int8 -> float (DEQUANTIZE) or int8 -> uint8 (QUANTIZE)
    adapters = (schema.BuiltinOperator.DEQUANTIZE, schema.BuiltinOperator.QUANTIZE)
    dequantized = set()
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if (codes[op.OpcodeIndex()] in adapters and op.OutputsLength() and op.Outputs(0) in outputs):
            dequantized.add(op.Inputs(0))
    return [MODEL_OUTPUT if op.output in outputs or op.output in dequantized else op.name for op in ops]


def _correctable_ops(model, schema) -> List[_Op]:
    """CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops with an int8 output and an int32 bias."""
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()))
    b = schema.BuiltinOperator
    options = {b.CONV_2D: schema.Conv2DOptions, b.DEPTHWISE_CONV_2D: schema.DepthwiseConv2DOptions,
               b.FULLY_CONNECTED: schema.FullyConnectedOptions}
    sg = model.Subgraphs(0)
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = codes[op.OpcodeIndex()]
        if code not in options or op.InputsLength() < 3 or op.Inputs(2) < 0:
            continue
        out, bias = sg.Tensors(op.Outputs(0)), sg.Tensors(op.Inputs(2))
        if out.Type() != schema.TensorType.INT8 or bias.Type() != schema.TensorType.INT32:
            continue  # a float op (the stem of int8-mixed) or an int16 model: nothing to correct
        table = op.BuiltinOptions()
        activation = 0
        if table is not None:
            opts = options[code]()
            opts.Init(table.Bytes, table.Pos)
            activation = opts.FusedActivationFunction()
        ops.append(_Op(i, out.Name().decode("utf-8"), op.Outputs(0), op.Inputs(2), bias.Buffer(), activation))
    return ops


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """Up to ``k`` distinct indices spread evenly over ``range(n)``, first and last included.

    Calibration arrays come sorted by class (``convert.calibration.stratified_pick``), so this
    gives each class its share where taking the first or last ``k`` would give one class.
    """
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def _feed(it, x: np.ndarray) -> None:
    inp = it.get_input_details()[0]
    if np.dtype(inp["dtype"]) != np.float32:
        x = quantize(x, *inp["quantization"], inp["dtype"])
    it.set_tensor(inp["index"], x)
    it.invoke()


def _mean_shift(probe: bytearray, op, x: np.ndarray, expected: "_ReferenceOutputs", k: int):
    """(per-channel mean shift of ``op``'s output from the float32 model's, the same in bias steps).

    Only elements inside both models' linear range count (not clipped to the int8 range, not cut
    by the activation), image by image: sums per channel, nothing kept."""
    it = _interpreter(probe)
    out = it._get_tensor_details(op.output, 0)
    scale, zero = out["quantization"]
    lo, hi = _LINEAR_RANGE.get(op.activation, (-np.inf, np.inf))
    total, n = 0.0, 0
    for i in range(len(x)):
        _feed(it, x[i:i + 1])
        q = it.get_tensor(op.output).astype(np.int32)
        f = expected.image(k, i).astype(np.float64)
        keep = (q > -128) & (q < 127) & (f > lo) & (f < hi)
        channels = f.shape[-1]
        total = total + np.where(keep, (q - zero) * scale - f, 0.0).reshape(-1, channels).sum(axis=0)
        n = n + keep.reshape(-1, channels).sum(axis=0)
    shift = total / np.maximum(n, 1)
    bias_scale = np.asarray(it._get_tensor_details(op.bias, 0)["quantization_parameters"]["scales"], np.float64)
    return shift, np.rint(shift / bias_scale).astype(np.int64)


def correct_biases(quantized: bytes, reference: bytes, images: np.ndarray,
                   max_images: int = DEFAULT_IMAGES) -> Tuple[bytes, Optional[dict]]:
    """Correct the int32 biases of ``quantized`` so each layer's mean output matches ``reference``.

    Args:
        quantized: an integer ``.tflite`` model (int8 activations; any input/output type).
        reference: the float32 ``.tflite`` model of the same Keras model (same tensor names).
        images: preprocessed float32 images (N, H, W, C) from the training split.
        max_images: use at most this many of ``images``, evenly spaced through the array (so
            a class-sorted calibration array gives each class its share).

    Returns:
        (corrected model bytes, record for the metadata), or (``quantized``, None) when it has no
        op to correct.

    Raises:
        ModelError: no images, or the two models do not share the ops' tensor names.
    """
    from ai_edge_litert import schema_py_generated as schema
    from lungedge.edge_runtime.progress import bar

    if not hasattr(images, "ndim"):
        images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ModelError("bias correction needs calibration images (N, H, W, C)")
    x = np.asarray(images[evenly_spaced(len(images), max_images)], np.float32)
    data = bytearray(quantized)
    model = schema.Model.GetRootAs(data, 0)
    ops = _correctable_ops(model, schema)
    if not ops:
        return bytes(quantized), None
    t0 = time.perf_counter()
    # the measuring copy: every op's output readable; its biases are corrected in place, op by op
    probe = _with_outputs(data, [op.output for op in ops])
    probe_model = schema.Model.GetRootAs(probe, 0)
    with tempfile.TemporaryDirectory(prefix="lungedge-bias-") as folder:
        expected = _ReferenceOutputs(reference, _reference_names(model, ops), x, folder)
        changes = []
        for k, op in enumerate(bar(ops, desc="bias correction", unit="layer")):
            shift, step = _mean_shift(probe, op, x, expected, k)
            for m in (model, probe_model):  # views into ``data`` and ``probe``
                view = m.Buffers(op.buffer).DataAsNumpy().view(np.int32)
                view[:] = np.clip(view.astype(np.int64) - step, -2**31, 2**31 - 1).astype(np.int32)
            changes.append((float(np.max(np.abs(shift))), op.name.split(";")[0][-60:]))
    largest = max(changes)
    return bytes(data), {
        "method": "sequential empirical bias correction of every conv/fully connected op "
                  "against the float32 model (Nagel et al. 2019)",
        "layers": len(ops), "images": int(len(x)), "seconds": round(time.perf_counter() - t0, 1),
        "largest_shift": {"layer": largest[1], "value": largest[0]},
    }
