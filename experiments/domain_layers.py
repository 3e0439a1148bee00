"""Which layers should the domain score read? Measured on a fine-tuned run's own features.

``domain_methods.py`` ranked the methods on frozen ImageNet features; this compares, on the
features of a *trained run* (the model a file is converted from), the shipped score (Mahalanobis,
Ledoit-Wolf, pooled ``block_16_project_BN``) with scores that also read an earlier block, where
low-level changes (an inverted exposure) show more than in the last block:

  b16             the shipped score
  b16+bN          one Mahalanobis score on the two pooled layers concatenated
  max(b16,bN)     the larger of the two layers' scores, each divided by its median on the fit holdout

The threshold is taken as a conversion takes it (split-conformal 99th percentile of the
validation images and one benign variation of each, ``convert.domain_gate.benign_variants``).
In-domain: the run's test split, ``chest_xray_test_dev``, ``chest_xray_fullres`` (originals
the device resizes). Out-of-domain: ``--ood`` folders, generated frames, and the test images
inverted, rotated 90 degrees and upside down. Nothing is fitted on the out-of-domain sets.

Run:  python experiments/domain_layers.py --run RUN --out RUN/domain_layers \\
          --in dev=../shared/data/chest_xray_test_dev --in fullres=../shared/data/chest_xray_fullres \\
          --ood ct=../shared/data/iq_othnccd --ood photos=../shared/data/ood_dev/photos
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

LAYERS = ("block_2_project_BN", "block_5_project_BN", "block_9_project_BN", "block_12_project_BN",
          "block_14_project_BN", "block_16_project_BN")


def _short(layer: str) -> str:
    return "b" + layer.split("_")[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--in", dest="inside", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--ood", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--fit", type=int, default=1200)
    ap.add_argument("--limit", type=int, default=300, help="images per test / out-of-domain set")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)

    import keras

    from lungedge.convert.calibration import load_images
    from lungedge.convert.domain_gate import benign_variants, generated_frames, transformed
    from lungedge.edge_runtime.image_files import expand_inputs
    from lungedge.edge_runtime.spec import ModelSpec

    t0 = time.time()
    spec = ModelSpec.from_json((a.run / "spec.json").read_text())
    pre = spec.preprocessing
    model = keras.saving.load_model(a.run / "model.keras", compile=False)
    base = model.layers[1]
    inner = keras.Model(base.inputs, [base.get_layer(n).output for n in LAYERS])
    data = json.loads((a.run / "metrics.json").read_text())["data"]
    rows = list(csv.DictReader(open(a.run / "split_manifest.csv")))
    rng = np.random.default_rng(0)
    by = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    for s in by:
        rng.shuffle(by[s])
    labels = list(spec.labels)

    def feats(x, what):
        t = time.time()
        out = {n: [] for n in LAYERS}
        for i in range(0, len(x), 32):
            ys = inner(np.asarray(x[i:i + 32], np.float32), training=False)
            for n, y in zip(LAYERS, ys):
                out[n].append(np.asarray(y, np.float64).mean(axis=(1, 2)))
        print(f"  {what}: {len(x)} images, {time.time() - t:.0f} s", flush=True)
        return {n: np.concatenate(v) for n, v in out.items()}

    def from_paths(paths, what):
        x, kept, _ = load_images([str(p) for p in paths], pre)
        return x, feats(x, what)

    from lungedge.convert.calibration import NormalizedImages

    fit_rows = by["train"][: a.fit]
    _, F_fit = from_paths([Path(data) / r["path"] for r in fit_rows], "fit (train split)")
    y_fit = np.array([labels.index(r["label"]) for r in fit_rows])
    hold_rows = by["train"][a.fit: a.fit + 200]
    _, F_hold = from_paths([Path(data) / r["path"] for r in hold_rows], "fit holdout (train split)")
    val_x, F_val = from_paths([Path(data) / r["path"] for r in by["val"][:400]], "val")
    F_varied = feats(NormalizedImages(benign_variants(val_x.pixels), pre), "val, benign variations")
    test_x, F_test = from_paths([Path(data) / r["path"] for r in by["test"][: a.limit]], "test")
    inside = {"test": F_test}
    for item in a.inside:
        name, folder = item.split("=", 1)
        paths = [p for p, problem in expand_inputs([folder]) if not problem][: a.limit]
        inside[name] = from_paths(paths, name)[1]
    outside = {}
    for item in a.ood:
        name, folder = item.split("=", 1)
        paths = [p for p, problem in expand_inputs([folder]) if not problem]
        rng.shuffle(paths)
        outside[name] = from_paths(paths[: a.limit], name)[1]
    frames = np.stack(list(generated_frames(pre.height, pre.width, pre.channels).values()))
    outside["generated frames"] = feats(NormalizedImages(frames, pre), "generated frames")
    for name, arr in transformed(test_x.pixels).items():
        outside[f"test {name}"] = feats(NormalizedImages(arr, pre), f"test {name}")

    from lungedge.convert.domain import fit as fit_domain

    def maha(layer_names):
        X = np.concatenate([F_fit[n] for n in layer_names], 1)
        d = fit_domain(X, y_fit, len(labels), "+".join(layer_names))
        w = d.whiten / math.sqrt(d.dim)
        c = d.means @ w

        def score(F):
            z = np.concatenate([F[n] for n in layer_names], 1) @ w
            return ((z[:, None, :] - c[None]) ** 2).sum(-1).min(1)
        return score

    scorers = {"b16": maha(["block_16_project_BN"])}
    s16 = scorers["b16"]
    med16 = float(np.median(s16(F_hold)))
    for n in LAYERS[:-1]:
        scorers[f"b16+{_short(n)}"] = maha([n, "block_16_project_BN"])
        sn = maha([n])
        medn = float(np.median(sn(F_hold)))
        scorers[f"max(b16,{_short(n)})"] = (lambda s1, m1, s2, m2: lambda F: np.maximum(s1(F) / m1, s2(F) / m2))(
            s16, med16, sn, medn)

    # three and more layers (the last block, the earliest and one between)
    for extra in (["block_2_project_BN", "block_5_project_BN"], ["block_2_project_BN", "block_9_project_BN"],
                  ["block_2_project_BN", "block_5_project_BN", "block_9_project_BN"]):
        scorers["b16+" + "+".join(_short(n) for n in extra)] = maha(extra + ["block_16_project_BN"])

    def conformal(scores):
        s = np.sort(scores)
        k = min(len(s), math.ceil((len(s) + 1) * 0.99))
        return float(s[k - 1])

    from sklearn.metrics import roc_auc_score

    results = {}
    for name, fn in scorers.items():
        th = conformal(np.concatenate([fn(F_val), fn(F_varied)]))
        ins = {k: fn(v) for k, v in inside.items()}
        row = {"threshold": th}
        row.update({f"in {k}": float(np.mean(v > th)) for k, v in ins.items()})
        allin = np.concatenate(list(ins.values()))
        for k, v in outside.items():
            o = fn(v)
            row[f"out {k}"] = float(np.mean(o > th))
            row[f"auroc {k}"] = float(roc_auc_score(np.r_[np.zeros(len(allin)), np.ones(len(o))], np.r_[allin, o]))
        results[name] = row
    cols = [c for c in next(iter(results.values())) if c != "threshold" and not c.startswith("auroc")]
    lines = [f"# Domain score layers on {a.run} (`python experiments/domain_layers.py`)", "",
             "Refused share per set (in-domain sets first); worst out-of-domain AUROC last.", "",
             "| score | threshold | " + " | ".join(cols) + " | worst AUROC |", "|---" * (len(cols) + 3) + "|"]
    for name, row in results.items():
        worst = min(v for k, v in row.items() if k.startswith("auroc"))
        lines.append(f"| {name} | {row['threshold']:.3g} | " + " | ".join(f"{100 * row[c]:.1f} %" for c in cols)
                     + f" | {worst:.4f} |")
    text = "\n".join(lines) + f"\n\n{time.time() - t0:.0f} s\n"
    (a.out / "results.md").write_text(text)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
