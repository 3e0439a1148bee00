"""The microcontroller target's parts that need no trained model (``convert.micro``): operator
names for TFLM's resolver, an operator TFLM lacks refused by name, the arena TFLM reports and the
generated header's arithmetic. The end-to-end check (``lungedge convert --variants micro`` on a
trained run, the C sources compiled and compared) is in test_commands.py."""

from __future__ import annotations

import numpy as np
import pytest

from lungedge.convert.micro import arena_with_margin, resolver_method
from lungedge.convert.micro_sources import pixel_lookup, threshold_q
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing


@pytest.mark.parametrize("op, method", [("CONV_2D", "AddConv2D"), ("DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"),
                                        ("FULLY_CONNECTED", "AddFullyConnected"), ("REDUCE_MIN", "AddReduceMin"),
                                        ("SQUARED_DIFFERENCE", "AddSquaredDifference"), ("EXPAND_DIMS", "AddExpandDims"),
                                        ("L2_POOL_2D", "AddL2Pool2D"), ("PADV2", "AddPadV2"), ("CUMSUM", "AddCumSum"),
                                        ("RELU6", "AddRelu6"), ("ADD_N", "AddAddN"), ("BATCH_TO_SPACE_ND", "AddBatchToSpaceNd")])
def test_resolver_method_follows_tflm_names(op, method):
    assert resolver_method(op) == method


def test_arena_margin_rounds_up_to_a_kib():
    assert arena_with_margin(1000) == 2048  # 1100 -> 2 KiB
    assert arena_with_margin(100_000) % 1024 == 0 and arena_with_margin(100_000) >= 110_000


def test_pixel_lookup_is_the_runtime_normalisation_quantised():
    spec = ModelSpec(labels=("a", "b"), preprocessing=Preprocessing(16, 16, mean=(127.5,), std=(127.5,)))
    lut = pixel_lookup(spec, 1 / 127.5, 0)
    assert lut.shape == (3, 256) and lut.dtype == np.int8
    closed = np.clip(np.rint(np.arange(256) - 127.5), -128, 127)  # ((p - 127.5) / 127.5) / (1 / 127.5)
    assert np.abs(lut[0].astype(int) - closed).max() <= 1 and np.all(np.diff(lut[0].astype(int)) >= 0)
    assert np.array_equal(lut[0], lut[2])


def test_threshold_q_is_the_smallest_integer_at_or_above():
    scale, zero = 1 / 256, -128
    q = threshold_q(0.5, scale, zero)
    assert (q - zero) * scale >= 0.5 > (q - 1 - zero) * scale


@pytest.mark.needs_tf
def test_an_operator_tflm_lacks_is_refused_by_name():
    """A model with TOPK_V2 (no TFLM kernel) is refused naming the operator, not with TFLM's crash."""
    pytest.importorskip("tflite_micro")
    tf = pytest.importorskip("tensorflow")
    from lungedge.convert.micro import measure_arena
    from lungedge.edge_runtime.errors import ModelError

    f = tf.function(lambda x: tf.math.top_k(x, k=2).values, input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    data = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()
    with pytest.raises(ModelError, match="no kernel for operator TOPK_V2"):
        measure_arena(data)


@pytest.mark.needs_tf
def test_the_arena_is_what_tflm_reports_and_runs_with_it():
    """The arena comes from TFLM's recording allocator; the model runs in exactly that many bytes
    and not in much fewer."""
    pytest.importorskip("tflite_micro")
    tf = pytest.importorskip("tensorflow")
    from lungedge.convert.micro import _interpreter, measure_arena
    from lungedge.edge_runtime.errors import ModelError

    inp = tf.keras.Input((16, 16, 3))
    x = tf.keras.layers.Conv2D(8, 3, activation="relu")(inp)
    out = tf.keras.layers.Dense(2)(tf.keras.layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inp, out)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.normal(size=(1, 16, 16, 3)).astype(np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    data = conv.convert()
    arena = measure_arena(data)["total"]
    assert arena > 16 * 16 * 3  # holds at least the input
    interp = _interpreter(data, arena)
    interp.set_input(np.zeros((1, 16, 16, 3), np.int8), 0)
    interp.invoke()
    with pytest.raises(ModelError):
        _interpreter(data, arena // 4)
