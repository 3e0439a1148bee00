"""The quantisation gate: one rule, used by ``lungedge convert``, the pipeline and the demo.

Per variant: a variant **passes** when
  1. it learned (``edge_runtime.learning_floor``: accuracy above the majority-class rate, one-sided
     binomial test at p < 0.01, on the same test images as the Keras model),
  2. its accuracy is at most ``max_accuracy_drop`` percentage points below the Keras model's, and
  3. its recall of the disease class (of every class when there is none) is at most
     ``max_recall_drop`` points below the Keras model's;

where a drop beyond its limit counts only when the test set can tell it from chance: on the
images the two models decide differently (of all images, or of that class for a recall), the
variant must be wrong where Keras is right significantly more often than the reverse (exact
one-sided sign test, McNemar's, at p < ``PAIRED_ALPHA``). On 60 test images one flipped image is
1.7 points, more than the 1-point limit, and proves nothing; on 600, twelve one-way flips do.

Overall: the conversion **passes** when every float variant (float32, float16, dynamic) passes
and, if integer variants were asked for, at least one of them passes. The file to ship is the
first passing integer variant in ``INTEGER_PREFERENCE`` (smallest and fastest first), else the
first passing float variant in ``FLOAT_PREFERENCE``; when nothing passes, nothing is shipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import comb
from typing import List, Optional, Sequence

#: Integer variants, in order of preference for shipping: full integer first.
INTEGER_PREFERENCE = ("int8", "uint8", "int8-float-io", "int8-mixed", "micro")
#: Float variants (weights may be quantised, activations are float), in order of preference.
FLOAT_PREFERENCE = ("float16", "dynamic", "float32")

DEFAULT_MAX_ACCURACY_DROP = 1.0
DEFAULT_MAX_RECALL_DROP = 2.0
#: Significance a drop beyond its limit must reach on the images where the models disagree.
PAIRED_ALPHA = 0.05


def is_integer(variant: str) -> bool:
    return variant in INTEGER_PREFERENCE


def paired_worse(y_true, keras_pred, pred, mask=None) -> dict:
    """McNemar's exact one-sided test that ``pred`` is worse than ``keras_pred``: ``worse`` images
    the variant gets wrong and Keras right, ``better`` the reverse, ``p`` = P(X >= worse) for
    X ~ Binomial(worse + better, 1/2)."""
    import numpy as np

    y, k, v = (np.asarray(a) for a in (y_true, keras_pred, pred))
    keep = np.ones(len(y), bool) if mask is None else np.asarray(mask, bool)
    worse = int(np.sum(keep & (k == y) & (v != y)))
    better = int(np.sum(keep & (k != y) & (v == y)))
    n = worse + better
    p = sum(comb(n, i) for i in range(worse, n + 1)) / 2.0 ** n if n else 1.0
    return {"worse": worse, "better": better, "p": p}


def variant_reasons(keras_m: dict, m: dict, disease: Optional[str], max_accuracy_drop: float,
                    max_recall_drop: float, learned: Optional[bool] = True, floor_sentence: str = "",
                    paired: Optional[tuple] = None) -> List[str]:
    """Why a variant fails the gate (empty list: it passes). ``m`` and ``keras_m`` are
    ``edge_runtime.metrics.classification_metrics`` results on the same images; ``paired``
    (true labels, Keras's decisions, the variant's decisions, as class indices) turns on the
    paired test of the module's rule. Without it a drop beyond its limit fails on its own."""
    reasons = []
    if learned is False:
        reasons.append(floor_sentence or "the model did not learn")
    drop = 100.0 * (keras_m["accuracy"] - m["accuracy"])
    if drop > max_accuracy_drop + 1e-9:
        why = _significant(paired, None)
        if why is not None:
            reasons.append(f"accuracy {drop:.2f} points below Keras (limit {max_accuracy_drop:g}{why})")
    names = list(keras_m["per_class"])
    for name in ([disease] if disease else names):
        rdrop = 100.0 * (keras_m["per_class"][name]["recall"] - m["per_class"][name]["recall"])
        if rdrop > max_recall_drop + 1e-9:
            why = _significant(paired, names.index(name))
            if why is not None:
                reasons.append(f"{name} recall {rdrop:.2f} points below Keras (limit {max_recall_drop:g}{why})")
    return reasons


def _significant(paired: Optional[tuple], cls: Optional[int]) -> Optional[str]:
    """None when the paired test cannot tell the drop from chance; else the words for the reason."""
    if paired is None:
        return ""
    y = paired[0]
    t = paired_worse(*paired, mask=None if cls is None else [c == cls for c in y])
    if t["p"] >= PAIRED_ALPHA:
        return None
    return f"; {t['worse']} images worse, {t['better']} better, paired p = {t['p']:.2g}"


@dataclass
class GateVerdict:
    """The overall verdict of one conversion."""

    passed: bool
    ship: Optional[str]  # the variant to ship, or None
    failed: List[str] = field(default_factory=list)  # variants that failed their own gate
    blocking: List[str] = field(default_factory=list)  # the failures that fail the conversion
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def overall(rows: Sequence[dict]) -> GateVerdict:
    """The conversion's verdict from its per-variant rows (``variant`` and ``gate`` keys)."""
    gates = {r["variant"]: r["gate"] for r in rows}
    failed = [v for v, g in gates.items() if g != "passed"]
    integers = [v for v in INTEGER_PREFERENCE if v in gates]
    floats = [v for v in FLOAT_PREFERENCE if v in gates]
    ship_int = next((v for v in integers if gates[v] == "passed"), None)
    ship = ship_int or next((v for v in floats if gates[v] == "passed"), None)
    blocking = [v for v in failed if not is_integer(v)] + (integers if integers and not ship_int else [])
    passed = not blocking and ship is not None
    if passed and not failed:
        msg = f"every variant passed; ship model_{ship}.tflite"
    elif passed:
        msg = (f"passed: {', '.join(failed)} failed the gate but {ship} passed; ship model_{ship}.tflite")
    elif ship:
        msg = f"FAILED ({', '.join(blocking)} failed); the best passing file is model_{ship}.tflite"
    else:
        msg = "FAILED: no variant passed; nothing to ship"
    return GateVerdict(passed, ship, failed, blocking, msg)
