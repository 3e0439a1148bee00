"""Class activation maps inside the converted file: a second signature, ``heatmap``.

The device draws where the model looked with the model file alone (no TensorFlow, no
gradients). For the classifiers built here (base -> global average pooling -> head of Dense
layers with ReLU -> Dense logits -> softmax) the map of class ``c`` at each location of the
last convolutional features ``F`` (7x7x1280 for MobileNetV2 at 224) is

    CAM_c(i, j) = (m_n * (... (m_1 * (F(i, j) W_1)) ...) W_n) . (W_out[:, c] - mean_k W_out[:, k])

where ``m_l`` is 1 for the hidden units of layer ``l`` that are active (ReLU input > 0) on the
pooled features of this image and 0 otherwise. The head is linear within those masks, so the
mean of the map over locations is exactly class ``c``'s logit minus the mean logit, less the
biases (Zhou et al. 2016, "Learning deep features for discriminative localization", for a
GAP -> Dense head, where the masks vanish and ``CAM_c = F . W[:, c]``; with hidden layers this
is Grad-CAM's map without its final ReLU, computed in closed form). Centring on the mean logit
keeps what softmax ignores out of the map: for two classes the predicted class's map is half
its log-odds evidence.

The Keras model with two outputs (probabilities, map for every class) is converted like the
classifier, so every variant (int8 included) gets the map quantised from the same calibration.
The converted graph is then split into two subgraphs that share every weight buffer:

- subgraph 0, signature ``serving_default``: image -> probabilities, the classifier exactly as
  before (one input, one output), which is what interpreters, MediaPipe and the Task Library
  run by default, so single-output consumers see no change;
- subgraph 1, signature ``heatmap``: image -> probabilities and heatmap (1, h, w, classes).

A model whose head is not of that form converts without the signature (``heatmap_model``
returns None), and the runtime says the file has no heat map.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

#: The second signature's key and its output names.
SIGNATURE = "heatmap"
PROBABILITIES, HEATMAP = "probabilities", "heatmap"
#: The domain score's name in the default signature (``convert.domain``).
DOMAIN_SCORE = "domain_score"
#: A hidden unit's mask is min(relu(z) * MASK_GAIN, 1): 1 for any z above 1/MASK_GAIN (in an
#: integer model, for any z of one quantisation step or more), 0 otherwise.
MASK_GAIN = 1e4


def head_layers(model) -> Optional[Tuple[object, object, list]]:
    """(base, pooling layer, head layers flattened) when ``model`` is base -> GAP -> Dense head."""
    import keras

    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    if len(layers) < 3:
        return None
    base, pool = layers[0], layers[1]
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D) or len(base.output.shape) != 4:
        return None
    head: list = []
    for layer in layers[2:]:
        if isinstance(layer, keras.Sequential):
            head.extend(l for l in layer.layers if not isinstance(l, keras.layers.InputLayer))
        else:
            head.append(layer)
    return base, pool, head


def heatmap_model(model, domain=None):
    """The Keras model ``image -> [probabilities, heatmap]`` for ``model``, or None when its head
    is not Dense(ReLU)* -> Dense -> softmax after global average pooling. For a logits model
    (head ending in a linear Dense) the first output is its logits, as the default signature's.

    The probabilities path reuses ``model``'s own layers, so it is the same computation.
    """
    import keras
    from keras import ops

    parts = head_layers(model)
    if parts is None:
        return None
    base, pool, head = parts
    head = [l for l in head if not isinstance(l, keras.layers.Dropout)]
    if head and is_softmax(head[-1]):
        body = head[:-1]
        if not body or activation_name(body[-1]) != "linear":
            return None
    elif head and isinstance(head[-1], keras.layers.Dense) and activation_name(head[-1]) in ("softmax", "linear"):
        body = head  # softmax inside the last Dense, or a logits model (``keras_convert.centred_logits_model``)
    else:
        return None
    if not all(isinstance(l, keras.layers.Dense) for l in body):
        return None
    hidden, out = body[:-1], body[-1]
    if any(activation_name(l) != "relu" for l in hidden):
        return None
    image = keras.Input(tuple(model.input.shape[1:]), name="image")
    score = None
    if domain is not None:  # the domain score too, from the same base run (``convert.domain``)
        from .domain import base_with_score

        features, score = base_with_score(base, image, domain)
    else:
        features = base(image, training=False)
    pooled = pool(features)
    x = pooled
    for layer in head:
        x = layer(x)
    probabilities = x
    cam, a = features, pooled
    for i, layer in enumerate(hidden):
        w, b = layer.get_weights()[:2] if layer.use_bias else (layer.get_weights()[0], None)
        z = ops.matmul(a, ops.convert_to_tensor(w))
        if b is not None:
            z = z + ops.convert_to_tensor(b)
        a = ops.relu(z)
        mask = ops.minimum(a * MASK_GAIN, 1.0)
        cam = _fixed_dense(w, f"heatmap_hidden_{i}")(cam) * ops.reshape(mask, (-1, 1, 1, w.shape[1]))
    w_out = out.get_weights()[0]
    centred = w_out - w_out.mean(axis=1, keepdims=True)
    cam = _fixed_dense(centred, HEATMAP)(cam)
    outputs = [probabilities, cam] + ([score] if score is not None else [])
    return keras.Model(image, outputs, name=f"{model.name}_heatmap")


def _fixed_dense(kernel: np.ndarray, name: str):
    import keras

    layer = keras.layers.Dense(kernel.shape[1], use_bias=False, name=name, trainable=False)
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel.astype(np.float32)])
    return layer


def activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act))


def is_softmax(layer) -> bool:
    import keras

    return (isinstance(layer, keras.layers.Activation) and activation_name(layer) == "softmax") or \
        isinstance(layer, keras.layers.Softmax)


def split_heatmap(data: bytes) -> bytes:
    """Turn a converted two-output model (probabilities, heatmap) into two subgraphs sharing all
    buffers: 0 = ``serving_default`` (probabilities only, ops for the map removed), 1 = ``heatmap``.

    No TensorFlow: the TFLite schema's object API from ai_edge_litert.

    Raises:
        ModelError: the file is not a one-subgraph model with one input, a (1, classes) and a
            (1, h, w, classes) output.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from lungedge.edge_runtime.errors import ModelError
    from lungedge.edge_runtime.metadata import _TFLITE_IDENTIFIER, _sharing_builder

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if len(model.subgraphs or []) != 1:
        raise ModelError(f"heat-map split expects one subgraph, got {len(model.subgraphs or [])}")
    full = model.subgraphs[0]
    outs = list(full.outputs)
    shapes = {t: list(full.tensors[t].shape) for t in outs}
    scores = [t for t in outs if shapes[t] == [1, 1]]
    probs = [t for t in outs if len(shapes[t]) == 2 and t not in scores]
    maps = [t for t in outs if len(shapes[t]) == 4]
    if len(full.inputs) != 1 or len(probs) != 1 or len(maps) != 1 or len(scores) > 1:
        raise ModelError(f"heat-map split expects one input and outputs (1, classes), (1, h, w, classes) and "
                         f"optionally a (1, 1) domain score, got outputs {list(shapes.values())}")
    p, m = probs[0], maps[0]
    default = [p] + scores  # subgraph 0: the classifier, with its domain score when it has one
    classifier = _pruned(schema, full, default)
    heat = _pruned(schema, full, [p, m])
    heat.name = "heatmap"
    model.subgraphs = [classifier, heat]
    names = {PROBABILITIES: classifier.outputs[0]}
    if scores:
        names[DOMAIN_SCORE] = classifier.outputs[1]
    model.signatureDefs = [_signature(schema, "serving_default", 0, classifier, names),
                           _signature(schema, SIGNATURE, 1, heat, {PROBABILITIES: heat.outputs[0], HEATMAP: heat.outputs[1]})]
    builder = _sharing_builder(flatbuffers)(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _signature(schema, key: str, index: int, graph, outputs: dict):
    sig = schema.SignatureDefT()
    sig.signatureKey = key
    sig.subgraphIndex = index
    sig.inputs = [_tensor_map(schema, "image", graph.inputs[0])]
    sig.outputs = [_tensor_map(schema, name, t) for name, t in outputs.items()]
    return sig


def _tensor_map(schema, name: str, index: int):
    tm = schema.TensorMapT()
    tm.name = name
    tm.tensorIndex = int(index)
    return tm


def _pruned(schema, graph, outputs: List[int]):
    """A copy of ``graph`` computing only ``outputs``: the ops they need, their tensors (renumbered)."""
    import copy

    producer = {}
    for i, op in enumerate(graph.operators):
        for t in op.outputs:
            if t >= 0:
                producer[int(t)] = i
    needed_ops, stack = set(), [int(t) for t in outputs]
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in needed_ops:
            continue
        needed_ops.add(i)
        stack.extend(int(x) for x in graph.operators[i].inputs if x >= 0)
        stack.extend(int(x) for x in (graph.operators[i].intermediates or []) if x >= 0)
    ops = [copy.copy(graph.operators[i]) for i in sorted(needed_ops)]
    used = sorted({int(t) for op in ops for t in list(op.inputs) + list(op.outputs) + list(op.intermediates or [])
                   if t >= 0} | {int(t) for t in graph.inputs} | {int(t) for t in outputs})
    remap = {old: new for new, old in enumerate(used)}
    g = schema.SubGraphT()
    g.tensors = [graph.tensors[t] for t in used]
    g.inputs = [remap[int(t)] for t in graph.inputs]
    g.outputs = [remap[int(t)] for t in outputs]
    for op in ops:
        op.inputs = [remap[int(t)] if t >= 0 else -1 for t in op.inputs]
        op.outputs = [remap[int(t)] if t >= 0 else -1 for t in op.outputs]
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = [remap[int(t)] for t in op.intermediates]
    g.operators = ops
    g.name = "classifier"
    return g
