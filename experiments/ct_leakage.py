"""How much of a CT cross-validation score is neighbouring slices of the same patient?

    python experiments/ct_leakage.py --data "../shared/data/iq_othnccd/The IQ-OTHNCCD lung cancer dataset" \\
        --out runs/ct_leakage

IQ-OTH/NCCD has no patient ids, but its files number the slices in order. This measures, on
frozen MobileNetV2 ImageNet features (global average pooled, the recipe's preprocessing; nothing
is trained on the images):

- **neighbours**: for every slice, its nearest other slice in feature space (cosine, standardised
  features): same class? how far apart are their file numbers, against random pairs of the class?
- **probes** under the folds ``lungedge train --cv K`` uses (``train.dataset.kfold_assignments``, the
  recipe's fractions and seed): a nearest-neighbour lookup (1-NN over the fold's train and
  validation slices, no training) and a logistic regression (balanced class weights, C chosen on
  the validation part by log loss), with split ``random`` and with split ``blocked`` at each
  ``--blocks`` size (blocks of that many consecutive slice numbers per class kept on one side).
  Accuracy (mean +- population std over folds) and the recall of the rarest class (mean and
  worst fold).

If a lookup of the nearest slice scores as well as a trained network on random folds, and falls
when neighbouring slices are kept apart, the random-fold score measures recognising patients
seen in training, not classifying new ones.

Writes ``ct_leakage.json``, ``ct_leakage.md`` and ``ct_leakage.png`` (accuracy and rarest-class
recall against block size) in ``--out``. Needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def standardise(f: np.ndarray, fit: np.ndarray) -> np.ndarray:
    mu, sd = fit.mean(0), fit.std(0) + 1e-6
    return (f - mu) / sd


def neighbour_adjacency(features: np.ndarray, labels: np.ndarray, numbers: np.ndarray, class_names, seed: int = 0) -> list:
    """Per class: the share of slices whose nearest other slice is of the same class, and, among
    those, the median file-number distance and the share within 3, next to the median distance
    of random pairs of the class."""
    f = standardise(features, features)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)
        same = labels[nn[idx]] == c
        d = np.abs(numbers[nn[idx]] - numbers[idx])[same]
        rand = np.abs(numbers[idx] - numbers[rng.choice(idx, len(idx))])
        rows.append({"class": name, "slices": int(len(idx)), "nearest_same_class": float(same.mean()),
                     "median_number_distance": float(np.median(d)) if len(d) else None,
                     "share_within_3": float((d <= 3).mean()) if len(d) else None,
                     "random_pair_median_distance": float(np.median(rand))})
    return rows


def probe(features: np.ndarray, labels: np.ndarray, folds, rare: int) -> dict:
    """1-NN and logistic regression on each fold's test part (see the module doc)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.neighbors import KNeighborsClassifier

    classes = np.unique(labels)
    out = {}
    for name in ("nearest_neighbour", "logistic_regression"):
        accs, rares, tests = [], [], []
        for a in folds:
            tr, va, te = (np.flatnonzero(a == s) for s in ("train", "val", "test"))
            if name == "nearest_neighbour":
                ref = np.concatenate([tr, va])
                m = KNeighborsClassifier(1, metric="cosine").fit(standardise(features[ref], features[ref]), labels[ref])
                pred = m.predict(standardise(features[te], features[ref]))
            else:
                x = lambda i: standardise(features[i], features[tr])  # noqa: E731
                best = None
                for c in C_GRID:
                    m = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x(tr), labels[tr])
                    loss = log_loss(labels[va], m.predict_proba(x(va)), labels=classes)
                    if best is None or loss < best[0]:
                        best = (loss, m)
                pred = best[1].predict(x(te))
            yt = labels[te]
            accs.append(float((pred == yt).mean()))
            rares.append(float((pred[yt == rare] == rare).mean()) if (yt == rare).any() else float("nan"))
            tests.append(int(len(te)))
        out[name] = {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                     "accuracy_per_fold": accs, "rare_recall_mean": float(np.nanmean(rares)),
                     "rare_recall_min": float(np.nanmin(rares)), "rare_recall_per_fold": rares, "test_sizes": tests}
    return out


def frozen_features(paths, recipe, verbose: bool = True) -> np.ndarray:
    """Global-average-pooled frozen MobileNetV2 features, as the recipe's model computes them."""
    from lungedge.train.input_data import image_dataset
    from lungedge.train.model import build_model
    from lungedge.train.training import preprocessing_for

    built = build_model(recipe, 2)
    ds = image_dataset(paths, None, preprocessing_for(recipe), recipe.batch_size, cache=None)
    return np.asarray(built.features.predict(ds, verbose=1 if verbose else 0), dtype=np.float32)


def _markdown(res: dict) -> str:
    lines = [f"# CT leakage: `{res['data']}`", "",
             f"{res['images']} slices; frozen MobileNetV2 ImageNet features at {res['image_size']} px; "
             f"{res['k']}-fold stratified folds, seed {res['seed']} (the folds of `lungedge train --cv {res['k']}`); "
             f"rarest class: {res['rare_class']}. Command: `{res['command']}`.", "",
             "## Nearest slice in feature space", "",
             "| class | slices | nearest is same class | median file-number distance | within 3 | random pairs: median distance |",
             "|---|---|---|---|---|---|"]
    for r in res["neighbours"]:
        lines.append(f"| {r['class']} | {r['slices']} | {r['nearest_same_class']:.3f} | {r['median_number_distance']} | "
                     f"{r['share_within_3']:.3f} | {r['random_pair_median_distance']} |")
    lines += ["", "## Probes on the folds (no network training)", "",
              "| split | probe | accuracy (mean ± std) | per fold | rarest-class recall: mean | worst fold |",
              "|---|---|---|---|---|---|"]
    for row in res["probes"]:
        if "refused" in row:
            lines.append(f"| {row['split']} | refused | {row['refused']} | | | |")
            continue
        for name, p in row["results"].items():
            lines.append(f"| {row['split']} | {name.replace('_', ' ')} | {100 * p['accuracy_mean']:.2f} ± "
                         f"{100 * p['accuracy_std']:.2f} % | {', '.join(f'{100 * a:.1f}' for a in p['accuracy_per_fold'])} | "
                         f"{p['rare_recall_mean']:.3f} | {p['rare_recall_min']:.3f} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["probes"] if "results" in r]
    xs = [0 if r["block"] is None else r["block"] for r in rows]
    labels = ["random" if r["block"] is None else str(r["block"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("nearest_neighbour", "o-"), ("logistic_regression", "s--")):
        for ax, key in zip(axes, ("accuracy_mean", "rare_recall_mean")):
            ax.plot(range(len(xs)), [r["results"][name][key] for r in rows], style, label=name.replace("_", " "))
    for ax, title in zip(axes, ("accuracy (mean over folds)", f"{res['rare_class']} recall (mean over folds)")):
        ax.set_xticks(range(len(xs)), labels)
        ax.set_xlabel("split: random, or blocks of N consecutive slice numbers")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle("Frozen-feature probes on CT folds: what neighbouring slices are worth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Numbered CT slices: DIR/<class>/<name (N).jpg>.")
    ap.add_argument("--out", required=True, help="Output folder.")
    ap.add_argument("--recipe", default="ct-lung-cancer-plus", help="Recipe for preprocessing, fractions and seed.")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--blocks", default="5,10,16,20", help="Block sizes for split 'blocked' (comma-separated).")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the lungedge command: progress, not TensorFlow's start-up
    import logging

    log = logging.getLogger("lungedge")  # the data check's lines on stderr, as the lungedge command shows them
    if not log.handlers:
        lines = logging.StreamHandler()
        lines.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(lines)
    log.setLevel(logging.INFO)

    from lungedge.edge_runtime.errors import ConfigError, LungedgeError
    from lungedge.train.dataset import kfold_assignments, slice_number
    from lungedge.train.recipes import get_recipe
    from lungedge.train.training import _checked_dataset

    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
        recipe = get_recipe(args.recipe)
        ds = _checked_dataset(recipe, args.data)  # unreadable files: one line each, left out
        numbers = [slice_number(p) for p in ds.paths]
        if None in numbers:
            raise ConfigError(f"{ds.paths[numbers.index(None)]}: no slice number in the file name")
        numbers = np.asarray(numbers)
        labels = np.asarray(ds.labels)
        rare = int(np.argmin(np.bincount(labels)))
        train_f, val_f, _ = recipe.fractions
        t0 = time.time()
        print(f"frozen features of {len(ds)} slices at {recipe.image_size} px ...", flush=True)
        feats = frozen_features(ds.paths, recipe)
        print(f"  {time.time() - t0:.0f} s", flush=True)
        res = {"data": args.data, "images": len(ds), "image_size": recipe.image_size, "k": args.folds,
               "seed": recipe.seed, "rare_class": ds.class_names[rare], "command": shlex.join(["python", "-m", "lungedge.train.ct_leakage", *sys.argv[1:]]),
               "unreadable_left_out": ds.failures,
               "neighbours": neighbour_adjacency(feats, labels, numbers, ds.class_names), "probes": []}
        for block in [None] + blocks:
            kind = "random" if block is None else "blocked"
            row = {"split": kind if block is None else f"blocked {block}", "block": block}
            try:
                folds = kfold_assignments(ds, args.folds, val_f / (train_f + val_f), kind, recipe.seed, block or 1)
            except ConfigError as exc:  # a class with too few blocks for the folds
                row["refused"] = str(exc)
                print(f"{row['split']:>12}: refused: {exc}", flush=True)
                res["probes"].append(row)
                continue
            row["results"] = probe(feats, labels, folds, rare)
            nn, lr = row["results"]["nearest_neighbour"], row["results"]["logistic_regression"]
            print(f"{row['split']:>12}: 1-NN {100 * nn['accuracy_mean']:.2f} %, rare recall {nn['rare_recall_mean']:.3f}; "
                  f"LR {100 * lr['accuracy_mean']:.2f} %, rare recall {lr['rare_recall_mean']:.3f}", flush=True)
            res["probes"].append(row)
    except LungedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ct_leakage.json").write_text(json.dumps(res, indent=2))
    (out / "ct_leakage.md").write_text(_markdown(res))
    _plot(res, out / "ct_leakage.png")
    print(f"wrote {out / 'ct_leakage.md'}, {out / 'ct_leakage.json'}, {out / 'ct_leakage.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
