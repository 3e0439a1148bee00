"""What a loaded classifier is: its facts as one dict, its tensors, its operators and how many
of them a delegate (XNNPACK) took. Read by ``lungedge inspect``, ``bench`` and the reports."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .loader import LoadedModel
from .quant import tensor_quantization


def describe(model: LoadedModel, threshold_used: bool, gate_on: bool) -> dict:
    """The model's facts: file, digest, integrity, runtime, tensors, labels, decision, domain gate.

    Args:
        model: the loaded model.
        threshold_used: the classifier applies the model's decision threshold.
        gate_on: the classifier refuses what the file's domain gate refuses.
    """
    spec = model.spec
    return {
        "model": model.path,
        "sha256": model.sha256,
        "size_bytes": model.size,
        "integrity": model.integrity,
        "guarded_load": model.guarded,
        "backend": model.backend.name,
        "backend_version": model.backend.version,
        "threads": model.threads,
        "input_dtype": np.dtype(model.input["dtype"]).name,
        "output_dtype": np.dtype(model.output["dtype"]).name,
        "input_shape": [int(x) for x in model.input["shape"]],
        "labels": list(spec.labels),
        "has_metadata": model.has_metadata,
        "metadata_source": model.metadata_source,
        "standard_metadata": model.standard is not None,
        "threshold": spec.threshold.to_dict() if threshold_used else None,
        "variant": spec.variant,
        "recipe": spec.recipe,
        "heatmap": model.has_heatmap,
        "domain": model.domain.to_dict() if model.domain is not None else None,
        "domain_gate": "on" if gate_on else ("off" if model.domain is not None else "none"),
        "intended": dict(spec.intended) if model.has_metadata else {},
    }


def tensor_info(details: dict) -> dict:
    """Name, shape, dtype and quantisation (scale, zero point; None for float) of a tensor."""
    q = tensor_quantization(details)
    return {"name": str(details["name"]), "shape": [int(x) for x in details["shape"]],
            "dtype": np.dtype(details["dtype"]).name,
            "quantization": None if q is None else {"scale": q[0], "zero_point": q[1]}}


def delegate_nodes(interpreter) -> int:
    """How many nodes of the graph a delegate (XNNPACK) took; 0 when none did, -1 when the
    backend cannot list nodes."""
    nodes = _nodes(interpreter)
    if nodes is None:
        return -1
    return sum(1 for op in nodes if _is_delegate(op))


def operators(interpreter) -> List[dict]:
    """The graph's operators by name: ``{"op", "count", "delegated"}``, most frequent first.

    ``delegated`` counts the nodes inside a delegate's partitions (XNNPACK on CPU): found by
    walking back from each delegate node's outputs to its inputs through the original
    nodes (``_get_ops_details`` lists both). Empty when the backend cannot list nodes.
    """
    nodes = _nodes(interpreter)
    if nodes is None:
        return []
    original = [n for n in nodes if not _is_delegate(n)]
    delegated = _delegated(nodes, original)
    counts: dict = {}
    for n in original:
        row = counts.setdefault(str(n["op_name"]), {"op": str(n["op_name"]), "count": 0, "delegated": 0})
        row["count"] += 1
        row["delegated"] += n["index"] in delegated
    return sorted(counts.values(), key=lambda r: (-r["count"], r["op"]))


def _delegated(nodes: list, original: list) -> set:
    """Indexes of the original nodes inside some delegate node's partition."""
    producer = {int(t): n["index"] for n in original for t in n["outputs"]}
    by_index = {n["index"]: n for n in original}
    delegated: set = set()
    for node in nodes:
        if not _is_delegate(node):
            continue
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        while stack:
            t = stack.pop()
            i = producer.get(t)
            if t in boundary or i is None or i in delegated:
                continue
            delegated.add(i)
            stack.extend(int(x) for x in by_index[i]["inputs"] if int(x) >= 0)
    return delegated


def _nodes(interpreter) -> Optional[list]:
    try:
        return interpreter._get_ops_details()
    except Exception:  # a backend without node listing, or a closed classifier
        return None


def _is_delegate(node: dict) -> bool:
    return "DELEGATE" in str(node.get("op_name", "")).upper()
