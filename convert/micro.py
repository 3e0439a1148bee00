"""The microcontroller target: a full-integer file run in TensorFlow Lite Micro and exported as C.

``lungedge convert RUN --variants micro`` writes ``model_micro.tflite`` (full integer, int8 input
and output, the same conversion as ``int8``) and, from it, ``micro/``:

- ``model_data.h`` / ``model_data.cc``: the file's bytes as a 16-byte aligned C array and its
  length (the same bytes: the standard metadata and lungedge's record stay inside);
- ``model_settings.h``: input shape, scale and zero point, a pixel-to-input lookup table, the
  labels, the output scales, the decision threshold and the domain gate's threshold as integers
  on the outputs, the measured tensor arena size; plain C++, no TFLM headers needed;
- ``model_ops.h``: a ``MicroMutableOpResolver`` with exactly the operators the model uses;
- ``main.cc``: an example application that classifies one image held as a C array;
- ``micro_report.json``: model bytes, arena bytes, operators and the TFLM-vs-LiteRT comparison.

The file is verified, not assumed: it is loaded in the TFLM interpreter (the ``tflite-micro``
package runs TFLM's reference kernels on this machine), the arena is the one TFLM's recording
allocator reports, and every test image's int8 outputs are compared with LiteRT's.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from lungedge.edge_runtime.errors import MissingDependencyError, ModelError

#: The arena written into the header: TFLM's measured total plus this share, rounded up to 1 KiB
#: (room for a TFLM build whose kernels keep a little more scratch than the Python package's).
ARENA_MARGIN = 0.10
#: Largest difference allowed between TFLM's and LiteRT's int8 outputs, in quantisation steps.
MAX_STEPS = 1
#: How the C array is aligned (TFLM needs 16 bytes for its flatbuffer reads on Cortex-M).
ALIGNMENT = 16

#: Builtin operator (TFLite schema name) -> ``MicroMutableOpResolver`` method where TFLM's name
#: does not follow the rule ``CONV_2D`` -> ``AddConv2D`` (tensorflow/lite/micro/micro_mutable_op_resolver.h).
_RESOLVER_EXCEPTIONS = {"BATCH_MATMUL": "AddBatchMatMul", "CUMSUM": "AddCumSum", "PADV2": "AddPadV2",
                        "RFFT2D": "AddRfft2D", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM"}


def resolver_method(op: str) -> str:
    """``MicroMutableOpResolver``'s method for a builtin operator name (``CONV_2D`` -> ``AddConv2D``)."""
    if op in _RESOLVER_EXCEPTIONS:
        return _RESOLVER_EXCEPTIONS[op]
    parts = op.split("_")
    return "Add" + "".join(p if re.fullmatch(r"\d+D", p) else p.capitalize() for p in parts)


def tflm_runtime():
    """TFLM's Python interpreter module (``tflite-micro`` from PyPI)."""
    try:
        from tflite_micro import runtime
    except Exception as exc:  # ImportError, or a wheel that does not load here
        raise MissingDependencyError(f"the micro variant is verified in TensorFlow Lite Micro: pip install "
                                     f"'lungedge[micro]' (tflite-micro; {type(exc).__name__}: {exc})") from None
    return runtime


def model_operators(data: bytes) -> List[str]:
    """The builtin operators a ``.tflite`` file's main graph uses, in the order they first appear."""
    from lungedge.edge_runtime.backend import load_backend

    backend = load_backend("auto")
    kwargs = {}
    resolver = getattr(getattr(backend.module, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
    if resolver is not None:  # the graph's own nodes, not XNNPACK's partitions
        kwargs["experimental_op_resolver_type"] = resolver
    interp = backend.interpreter_class(model_content=data, **kwargs)
    seen: List[str] = []
    for node in interp._get_ops_details():
        name = str(node["op_name"])
        if name not in seen:
            seen.append(name)
    return seen


@contextmanager
def _c_stderr():
    """Collect what C code writes to file descriptor 2 (TFLM prints its allocations and errors there)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        box = {"text": ""}
        try:
            os.dup2(tmp.fileno(), 2)
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode("utf-8", "replace")


def _interpreter(data: bytes, arena: int):
    """A TFLM interpreter on ``data`` with ``arena`` bytes; an operator TFLM lacks is named."""
    runtime = tflm_runtime()
    with _c_stderr() as err:
        try:
            interp = runtime.Interpreter.from_bytes(data, arena_size=int(arena))
        except Exception as exc:
            failure = exc
        else:
            failure = None
    if failure is not None:
        text = err["text"]
        missing = re.search(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'", text)
        if missing:
            raise ModelError(f"TensorFlow Lite Micro has no kernel for operator {missing.group(1)}: the model "
                             f"cannot run on a microcontroller") from None
        detail = " ".join(line.strip() for line in text.splitlines() if line.strip())[-400:]
        raise ModelError(f"TensorFlow Lite Micro cannot load the model ({type(failure).__name__}: {failure}"
                         f"{'; ' + detail if detail else ''})") from None
    return interp


def measure_arena(data: bytes, probe_arena: int = 16 * 1024 * 1024) -> Dict[str, int]:
    """The tensor arena TFLM allocates for ``data`` (its recording allocator's report after one invoke)."""
    interp = _interpreter(data, probe_arena)
    inp = interp.get_input_details(0)
    interp.set_input(np.zeros(tuple(inp["shape"]), dtype=inp["dtype"]), 0)
    with _c_stderr() as err:
        interp.invoke()
        interp.print_allocations()
    found = {k: int(v) for k, v in re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", err["text"])}
    if "total" not in found:
        raise ModelError(f"TensorFlow Lite Micro did not report its arena: {err['text'][-300:]!r}")
    return found


def arena_with_margin(measured: int) -> int:
    """The arena size for the header: measured plus ``ARENA_MARGIN``, rounded up to 1 KiB."""
    return int(-(-int(measured * (1.0 + ARENA_MARGIN)) // 1024) * 1024)


def _quantize_inputs(x: np.ndarray, inp: dict) -> np.ndarray:
    from lungedge.edge_runtime.quant import quantize

    q = inp["quantization_parameters"]
    return quantize(x, float(q["scales"][0]), int(q["zero_points"][0]), np.dtype(inp["dtype"]))


#: The two LiteRT set-ups TFLM is compared with: its reference kernels (``BUILTIN_REF``, the
#: integer arithmetic TFLM's kernels implement) and its default, XNNPACK (what a Raspberry Pi runs
#: and what the conversion gate measured). XNNPACK requantises in float and differs from the
#: reference kernels by a few steps per layer, compounding through the network (measured on a
#: MobileNetV2 0.35: up to 14 steps on the class output), so only the reference kernels can be
#: held to ``MAX_STEPS``; against XNNPACK the decisions are compared.
LITERT_SETUPS = ("reference", "xnnpack")


def _litert(data: bytes, setup: str):
    from lungedge.edge_runtime.backend import load_backend

    backend = load_backend("auto")
    kwargs = {"num_threads": 1}
    if setup == "reference":
        kinds = getattr(backend.module, "OpResolverType", None)
        if kinds is None:
            raise MissingDependencyError(f"{backend.describe()} cannot select its reference kernels; "
                                         "pip install 'lungedge[edge]' (LiteRT)")
        kwargs["experimental_op_resolver_type"] = kinds.BUILTIN_REF
    interp = backend.interpreter_class(model_content=data, **kwargs)
    interp.allocate_tensors()
    return interp


def compare_with_litert(data: bytes, x: np.ndarray, arena: int) -> dict:
    """Run every image of ``x`` (preprocessed float images) through TFLM and both LiteRT set-ups
    (``LITERT_SETUPS``) on the same int8 input: each runtime's output rows, and per set-up the
    largest difference from TFLM in quantisation steps, per output."""
    from lungedge.edge_runtime.progress import bar

    tflm = _interpreter(data, arena)
    lites = {k: _litert(data, k) for k in LITERT_SETUPS}
    first = lites[LITERT_SETUPS[0]]
    l_in, l_outs = first.get_input_details()[0], first.get_output_details()
    n_out = len(l_outs)
    for i, a in enumerate(l_outs):
        b = tflm.get_output_details(i)
        if tuple(a["shape"]) != tuple(b["shape"]):
            raise ModelError(f"output {i}: LiteRT shape {tuple(a['shape'])} vs TFLM {tuple(b['shape'])}")
    q_in = _quantize_inputs(x, l_in)
    rows: Dict[str, List[List[np.ndarray]]] = {k: [[] for _ in range(n_out)] for k in ("tflm", *LITERT_SETUPS)}
    for k in bar(range(len(q_in)), desc="TFLM vs LiteRT"):
        one = q_in[k : k + 1]
        tflm.set_input(one, 0)
        tflm.invoke()
        for i in range(n_out):
            rows["tflm"][i].append(np.asarray(tflm.get_output(i)).astype(np.int64).reshape(-1))
        for name, lite in lites.items():
            lite.set_tensor(l_in["index"], one)
            lite.invoke()
            for i in range(n_out):
                rows[name][i].append(np.asarray(lite.get_tensor(l_outs[i]["index"])).astype(np.int64).reshape(-1))
    stacked = {k: [np.stack(r) if r else np.zeros((0, 1), np.int64) for r in v] for k, v in rows.items()}
    steps = {name: [int(np.abs(stacked[name][i] - stacked["tflm"][i]).max()) if len(x) else 0 for i in range(n_out)]
             for name in LITERT_SETUPS}
    identical = {name: int(np.all([np.all(stacked[name][i] == stacked["tflm"][i], axis=1) for i in range(n_out)],
                                  axis=0).sum()) if len(x) else 0 for name in LITERT_SETUPS}
    return {"n": int(len(x)), "outputs": l_outs, "rows": stacked, "max_steps": steps, "images_identical": identical}


def _dequantized(rows: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    return (rows.astype(np.float64) - zero) * scale


def decisions(result: dict, spec) -> dict:
    """Each runtime's class probabilities, classes and domain verdicts, and how often LiteRT's
    (XNNPACK) agree with TFLM's."""
    from lungedge.edge_runtime.decision import decide, output_probabilities

    outs = result["outputs"]
    score_i = next((i for i, d in enumerate(outs) if int(np.prod(d["shape"])) == 1), None)
    class_i = next(i for i, d in enumerate(outs) if i != score_i)
    got = {}
    for who, rows in result["rows"].items():
        probs = output_probabilities(_dequantized(rows[class_i], outs[class_i]), spec.output, spec.temperature)
        got[who] = {"probs": probs, "class": decide(probs, spec.labels, spec.threshold)}
        if score_i is not None and spec.domain is not None:
            got[who]["score"] = _dequantized(rows[score_i], outs[score_i]).reshape(-1)
            got[who]["in_domain"] = got[who]["score"] <= spec.domain.threshold
    n = result["n"]
    agree = {"class": float(np.mean(got["xnnpack"]["class"] == got["tflm"]["class"])) if n else None}
    if "in_domain" in got["tflm"]:
        agree["in_domain"] = float(np.mean(got["xnnpack"]["in_domain"] == got["tflm"]["in_domain"])) if n else None
    return {"agreement_with_xnnpack": agree, "class_output": class_i, "score_output": score_i, "_runs": got}


def verify(data: bytes, x: np.ndarray, spec):
    """(``micro_report.json``'s facts about ``data``, each runtime's decisions on ``x``).

    Raises:
        ModelError: an operator TFLM lacks (named), TFLM cannot load or run it, or an output
            (classes, domain score) differs from LiteRT's reference kernels by more than
            ``MAX_STEPS`` on an image.
    """
    ops = model_operators(data)
    arena = measure_arena(data)
    header_arena = arena_with_margin(arena["total"])
    result = compare_with_litert(data, x, header_arena)
    verdicts = decisions(result, spec)
    runs = verdicts.pop("_runs")
    outs = result["outputs"]
    io = {"input": _qparams(lite_input_details(data)), "classes": _qparams(outs[verdicts["class_output"]])}
    if verdicts["score_output"] is not None:
        io["score"] = _qparams(outs[verdicts["score_output"]])
    names = {verdicts["class_output"]: "classes", verdicts["score_output"]: "domain_score"}
    report = {
        "model_bytes": len(data),
        "io": io,
        "operators": ops,
        "resolver": [resolver_method(o) for o in ops],
        "arena": {"measured_total": arena["total"], "measured_head": arena.get("head"),
                  "measured_tail": arena.get("tail"), "margin": ARENA_MARGIN, "header_bytes": header_arena,
                  "how": "TFLM RecordingMicroAllocator after one invoke (tflite-micro Python interpreter); "
                         "the comparison ran with the header's size"},
        "comparison": {"images": result["n"], "allowed_steps": MAX_STEPS,
                       "max_steps": {setup: {names[i]: s for i, s in enumerate(v)}
                                     for setup, v in result["max_steps"].items()},
                       "images_identical": result["images_identical"], **verdicts},
        "tflm_version": _tflm_version(),
    }
    for i, steps in enumerate(result["max_steps"]["reference"] if result["n"] else ()):
        if steps > MAX_STEPS:
            raise ModelError(f"TensorFlow Lite Micro's {names.get(i, f'output {i}')} output differs from LiteRT's "
                             f"reference kernels by {steps} quantisation steps on a test image (at most {MAX_STEPS} "
                             "allowed)")
    return report, runs


def _qparams(detail: dict) -> dict:
    scale, zero = detail["quantization"]
    return {"shape": [int(v) for v in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name,
            "scale": float(scale), "zero_point": int(zero)}


def lite_input_details(data: bytes) -> dict:
    from lungedge.edge_runtime.backend import load_backend

    interp = load_backend("auto").interpreter_class(model_content=data)
    return interp.get_input_details()[0]


def _example(x: np.ndarray, y, spec, picked: dict) -> Optional[dict]:
    """The first test image both runtimes accept and classify alike, as 8-bit pixels."""
    pre = spec.preprocessing
    tflm, lite = picked["tflm"], picked["xnnpack"]
    for k in range(len(x)):
        if lite["class"][k] != tflm["class"][k]:
            continue
        if "in_domain" in tflm and not (tflm["in_domain"][k] and lite["in_domain"][k]):
            continue
        pixels = np.clip(np.rint(x[k] * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)), 0, 255)
        label = spec.labels[int(tflm["class"][k])]
        truth = f"; its true class: {spec.labels[int(y[k])]}" if y is not None else ""
        return {"pixels": pixels.astype(np.uint8), "expected": label,
                "note": f"test image {k}: TFLM and LiteRT answer {label}{truth}"}
    return None


def _tflm_version() -> str:
    try:
        import tflite_micro

        return str(tflite_micro.__version__)
    except Exception:
        return "unknown"


def export(path: Path, x: np.ndarray, spec, y=None):
    """Verify ``path`` (a written ``model_micro.tflite``) in TFLM and write ``micro/`` beside it.

    Returns (the report, also ``micro/micro_report.json``; TFLM's own ``probs``, ``class`` and,
    with a gate, ``score`` and ``in_domain`` per image of ``x``).
    """
    from lungedge.edge_runtime.atomic_write import atomic_write_text

    from .micro_sources import sources

    data = Path(path).read_bytes()
    report, runs = verify(data, x, spec)
    if y is not None and len(y):
        from .variant_eval import summarize

        tflm = runs["tflm"]
        m = summarize(np.asarray(y), tflm["probs"], spec, spec.threshold)
        report["tflm_metrics"] = {"accuracy": m["accuracy"], "auc": m.get("auc"),
                                  "per_class_recall": {n: c["recall"] for n, c in m["per_class"].items()}}
        if "in_domain" in tflm:
            report["tflm_metrics"]["test_refused"] = float(1 - np.mean(tflm["in_domain"]))
    folder = Path(path).parent / "micro"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in sources(data, spec, report, _example(x, y, spec, runs)).items():
        atomic_write_text(str(folder / name), text)
    report["files"] = sorted(sources_names())
    atomic_write_text(str(folder / "micro_report.json"), json.dumps(report, indent=2) + "\n")
    return report, runs["tflm"]


def sources_names() -> Sequence[str]:
    from .micro_sources import FILES

    return list(FILES) + ["micro_report.json"]
