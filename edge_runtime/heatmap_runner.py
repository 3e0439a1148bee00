"""Class activation maps from the model file: its ``heatmap`` signature (written by
``convert.heatmap_signature``), run on an interpreter of its own. Drawing them is ``edge_runtime.heatmap_overlay``."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .backend import quiet_runtime
from .decision import output_probabilities
from .quant import dequantize_with, tensor_quantization

#: The signature that returns the class activation maps.
HEATMAP_SIGNATURE = "heatmap"


def has_heatmap_signature(interpreter, classes: int) -> bool:
    """True when the model has a ``heatmap`` signature: image -> probabilities, heatmap (1, h, w, classes)."""
    try:
        sig = interpreter.get_signature_list().get(HEATMAP_SIGNATURE)
    except Exception:  # tflite-runtime builds without signatures
        return False
    return bool(sig) and sorted(sig.get("outputs", [])) == ["heatmap", "probabilities"] and sig.get("inputs") == ["image"]


class HeatmapRunner:
    """The ``heatmap`` signature on an interpreter of its own (a signature runner keeps a
    reference that stops the default interpreter's ``invoke``, so it cannot share that one).

    Args:
        model: the ``LoadedModel`` (its bytes, backend, threads and resolved spec).
    """

    def __init__(self, model) -> None:
        with quiet_runtime():
            self._interpreter = model.backend.interpreter_class(model_content=model.data, num_threads=model.threads)
        self._run = self._interpreter.get_signature_runner(HEATMAP_SIGNATURE)
        outs = self._run.get_output_details()
        self._probs_q = tensor_quantization(outs["probabilities"])
        self._maps_q = tensor_quantization(outs["heatmap"])
        self._spec = model.spec

    def __call__(self, inp: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(class probabilities, maps (h, w, classes) float32) for one input batch of one."""
        out = self._run(image=inp)
        probs = output_probabilities(dequantize_with(out["probabilities"][0], self._probs_q), self._spec.output,
                                     self._spec.temperature)
        cams = dequantize_with(out["heatmap"][0], self._maps_q)
        del out  # the runner's outputs are views into the interpreter
        return probs, cams
