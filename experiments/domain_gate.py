"""The domain gate of converted files, measured: refusal rates and AUROC on in-domain and
out-of-domain sets (against the gate's targets in docs/DOMAIN.md), and the score distributions as a plot.

Runs on the device path (``edge_runtime`` only: no TensorFlow). For each ``--model``:

- in-domain: the run's test split (``--run``) and any ``--in NAME=DIR`` folder;
- out of domain: ``--ood NAME=DIR`` folders, 20 generated frames, and the in-domain test images
  inverted, turned 90 degrees and upside down;
- refused share through the whole gate (checks before the model, then the score), and the
  AUROC of the raw ``domain_score`` of each set against the run's test split.

    python experiments/domain_gate.py --run runs/ct --model runs/ct/model_int8.tflite \\
        --ood xray=../shared/data/chest_xray_test_dev --ood photos=../shared/data/ood_dev/photos --out runs/ct/domain
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an out-of-domain image > score of an in-domain one), ties half."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    order = np.argsort(np.concatenate([a, b]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([a, b])[order]
    i = 0
    while i < len(values):  # average ranks of ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rb = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2
    return float(rb / (len(a) * len(b)))


def measure(model: str, sets: dict, limit: int) -> dict:
    """``{set: {"n", "refused", "scores"}}`` for one file."""
    from lungedge.edge_runtime.classifier import Classifier, Failure, Refusal

    out = {}
    with Classifier(model) as gated, Classifier(model, domain_gate=False) as raw:
        if gated.domain is None:
            raise SystemExit(f"error: {model} has no domain gate")
        for name, items in sets.items():
            items = items[:limit]
            refused, scores, n = 0, [], 0
            for item in items:
                try:
                    res = gated.classify(item)
                    r2 = raw.classify(item)
                except Exception as exc:  # an unreadable image: not a refusal, left out
                    print(f"error: {name}: {exc}", file=sys.stderr)
                    continue
                if isinstance(res, Failure) and not isinstance(res, Refusal):
                    continue
                n += 1
                refused += isinstance(res, Refusal)
                if not isinstance(r2, Failure) and r2.domain is not None:
                    scores.append(r2.domain.score)
            out[name] = {"n": n, "refused": refused / n if n else None, "scores": scores,
                         "threshold": gated.domain.threshold}
    return out


def build_sets(args) -> tuple:
    from lungedge.convert.domain_gate import generated_frames, transformed
    from lungedge.edge_runtime.image_files import expand_inputs
    from lungedge.edge_runtime.preprocess import load_pixels
    from lungedge.train.runfolder import load_run

    run = load_run(args.run)
    spec = run.spec
    test = run.split("test")
    inside = {"test split": list(test.paths)}
    for item in args.inside:
        name, folder = item.split("=", 1)
        inside[name] = [p for p, problem in expand_inputs([folder]) if not problem]
    p = spec.preprocessing
    outside = {}
    for item in args.ood:
        name, folder = item.split("=", 1)
        outside[name] = [p_ for p_, problem in expand_inputs([folder]) if not problem]
    outside["generated frames"] = list(generated_frames(p.height, p.width, p.channels).values())
    pixels = np.stack([load_pixels(x, p) for x in inside["test split"][: args.limit]])
    for name, arr in transformed(pixels).items():
        outside[f"test {name}"] = list(arr)
    return inside, outside


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the training run folder (its test split is the in-domain reference)")
    ap.add_argument("--model", action="append", required=True, help="a converted .tflite (repeatable)")
    ap.add_argument("--in", dest="inside", action="append", default=[], help="NAME=DIR: more in-domain images")
    ap.add_argument("--ood", action="append", default=[], help="NAME=DIR: an out-of-domain set")
    ap.add_argument("--limit", type=int, default=400, help="at most this many images per set")
    ap.add_argument("--out", required=True, help="folder for domain_gate.{json,md,png}")
    args = ap.parse_args(argv)
    inside, outside = build_sets(args)
    results = {}
    for model in args.model:
        m = measure(model, {**inside, **outside}, args.limit)
        ref = m["test split"]["scores"]
        for name, row in m.items():
            row["auroc_vs_test"] = None if name in inside else auroc(ref, row["scores"])
        results[Path(model).name] = m
        print(f"{Path(model).name} (threshold {m['test split']['threshold']:.4g}):")
        for name, row in m.items():
            au = "" if row["auroc_vs_test"] is None else f", AUROC vs test {row['auroc_vs_test']:.4f}"
            print(f"  {name:<24} n {row['n']:>4}  refused {100 * (row['refused'] or 0):6.2f} %{au}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "domain_gate.json").write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    lines = [f"# Domain gate measured (`python {' '.join(sys.argv)}`)", ""]
    for model, m in results.items():
        lines += [f"## {model} (threshold {m['test split']['threshold']:.4g})", "",
                  "| set | images | refused % | AUROC vs the test split |", "|---|---|---|---|"]
        for name, row in m.items():
            au = "-" if row["auroc_vs_test"] is None else f"{row['auroc_vs_test']:.4f}"
            lines.append(f"| {name} | {row['n']} | {100 * (row['refused'] or 0):.2f} | {au} |")
        lines.append("")
    (out / "domain_gate.md").write_text("\n".join(lines))
    _plot(results, out / "domain_gate.png")
    print(f"wrote {out / 'domain_gate.md'}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.2 * len(results)), squeeze=False)
    for ax, (model, m) in zip(axes[:, 0], results.items()):
        names = [n for n, r in m.items() if r["scores"]]
        ax.boxplot([np.log10(np.maximum(m[n]["scores"], 1e-3)) for n in names], orientation="horizontal", tick_labels=names)
        ax.axvline(np.log10(m["test split"]["threshold"]), color="r", ls="--", label="threshold")
        ax.set_xlabel("log10 domain score")
        ax.set_title(model)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
