"""How converted models do on an external labelled set, and what site recalibration buys there.

    python experiments/external_dev.py --model runs/xray/model_float32.tflite --model runs/xray/model_int8.tflite \\
        --data ../shared/data/chest_xray_test_dev --target-recall 0.95 --folds 5 --out runs/xray/external_dev

For each ``.tflite`` file (on the device runtime, LiteRT, exactly as ``lungedge evaluate`` runs it):

- at the file's own threshold (chosen on the training folder's validation split): accuracy,
  recall of each class, ROC AUC with its bootstrap 95 % interval;
- site recalibration judged by K-fold cross-fitting within the set: the folds are stratified and,
  for Kermany file names, grouped by patient (scikit-learn ``StratifiedGroupKFold``); on each fold
  ``lungedge recalibrate``'s own choice (``recalibrate_outputs``: temperature, then the threshold for
  ``--target-recall``) is made on the other folds and applied to this one
  (``apply_recalibration``). The pooled held-out accuracy and disease recall are reported, with
  the per-fold values; a fold whose calibration part has too few disease images is refused by
  the same rule as the command. One draw of the folds is one sample: the cross-fit is repeated
  over ``--repeats`` draws (seeds ``--seed``, ``--seed + 1``, ...) and their mean, standard
  deviation and range are reported next to the first draw's.

Writes ``external_dev.json`` and ``external_dev.md`` in ``--out``, and ``external_dev_roc.png``
(ROC of every file, the file's operating point marked). Needs the ``bench`` extra (matplotlib,
scikit-learn for the folds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _groups(paths):
    from lungedge.edge_runtime.image_files import patient_id

    return np.array([patient_id(p) or Path(p).name for p in paths])


def cross_fit(p, y, groups, spec, k: int, target_recall: float, folds: int, seed: int) -> dict:
    """One K-fold cross-fit of ``lungedge recalibrate`` (patient-grouped, stratified folds drawn with
    ``seed``): each image decided by the recalibration chosen on the other folds; pooled numbers."""
    from sklearn.model_selection import StratifiedGroupKFold

    from lungedge.edge_runtime.recalibration import apply_recalibration, recalibrate_outputs

    held_out = np.empty(len(y), dtype=np.int64)
    per_fold = []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_idx, test_idx in splitter.split(np.zeros(len(y)), y, groups):
        res = recalibrate_outputs(p[fit_idx], y[fit_idx], spec, target_recall)
        held_out[test_idx] = apply_recalibration(p[test_idx], res)
        yt, pt = y[test_idx], held_out[test_idx]
        per_fold.append({"images": int(len(test_idx)), "threshold": res.threshold.value, "temperature": res.temperature,
                         "accuracy": float((pt == yt).mean()), "recall": float((pt[yt == k] == k).mean())})
    is_pos = y == k
    return {
        "folds": folds, "seed": seed, "target_recall": target_recall, "grouped_by": "patient (Kermany file names)",
        "accuracy": float((held_out == y).mean()), "recall": float((held_out[is_pos] == k).mean()),
        "specificity": float((held_out[~is_pos] != k).mean()), "per_fold": per_fold,
    }


def evaluate_file(model: str, data: str, target_recall: float, folds: int, seed: int = 0, repeats: int = 1) -> dict:
    """The file's numbers at its own threshold, the cross-fit with ``seed`` and, over ``repeats``
    fold draws (seeds ``seed``, ``seed + 1``, ...), the cross-fit's mean and spread."""
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.decision import decide
    from lungedge.edge_runtime.folder_eval import labelled_outputs
    from lungedge.edge_runtime.metrics import binary_auc, bootstrap_auc
    from lungedge.edge_runtime.recalibration import positive_label_of

    clf = Classifier(model)
    out = labelled_outputs(clf, data, progress=False)
    spec, labels = clf.spec, list(clf.labels)
    k = labels.index(positive_label_of(spec))
    y, p = out.y_true, out.probabilities
    pred = decide(p, labels, spec.threshold)
    is_pos = y == k
    row = {
        "model": str(model), "variant": spec.variant, "recipe": spec.recipe, "images": int(len(y)),
        "unreadable": len(out.failures), "refused_out_of_domain": len(out.refused), "majority_rate": float(max(is_pos.mean(), 1 - is_pos.mean())),
        "threshold": spec.threshold.to_dict() if spec.threshold else None,
        "accuracy": float((pred == y).mean()),
        "recall": {name: float((pred[y == i] == i).mean()) for i, name in enumerate(labels) if (y == i).any()},
        "auc": binary_auc(p[:, k], is_pos), "auc_ci95": bootstrap_auc(p[:, k], is_pos),
        "distinct_scores": int(len(np.unique(p[:, k]))),
    }
    groups = _groups(out.paths)
    row["cross_fit"] = cross_fit(p, y, groups, spec, k, target_recall, folds, seed)
    draws = [row["cross_fit"]] + [cross_fit(p, y, groups, spec, k, target_recall, folds, s)
                                  for s in range(seed + 1, seed + repeats)]
    acc, rec = np.array([d["accuracy"] for d in draws]), np.array([d["recall"] for d in draws])
    row["cross_fit_repeats"] = {
        "repeats": repeats, "seeds": [seed + i for i in range(repeats)], "accuracy": acc.tolist(), "recall": rec.tolist(),
        "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=0)),
        "recall_mean": float(rec.mean()), "recall_std": float(rec.std(ddof=0)),
    }
    row["_roc"] = (p[:, k].tolist(), is_pos.tolist(), float((pred[is_pos] == k).mean()), float((pred[~is_pos] == k).mean()))
    return row


def markdown(rows, data: str) -> str:
    lines = [f"External set `{data}`: {rows[0]['images']} images, majority-class rate {rows[0]['majority_rate']:.2%}.", "",
             "| file | accuracy | disease recall | other recall | AUC (95 % CI) | distinct scores | "
             f"recalibrated, {rows[0]['cross_fit']['folds']}-fold cross-fit (seed {rows[0]['cross_fit']['seed']}): "
             f"accuracy | recall | the same over {rows[0]['cross_fit_repeats']['repeats']} fold draws: accuracy "
             "mean ± std (min-max) | recall mean ± std (min-max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = list(r["recall"].values())
        ci = r["auc_ci95"] or (float("nan"), float("nan"))
        cf, rep = r["cross_fit"], r["cross_fit_repeats"]
        lines.append(f"| {Path(r['model']).parent.name}/{Path(r['model']).name} | {r['accuracy']:.4f} | {rec[-1]:.4f} | {rec[0]:.4f} | "
                     f"{r['auc']:.4f} ({ci[0]:.3f}-{ci[1]:.3f}) | {r['distinct_scores']} | {cf['accuracy']:.4f} | {cf['recall']:.4f} | "
                     f"{rep['accuracy_mean']:.4f} ± {rep['accuracy_std']:.4f} ({min(rep['accuracy']):.4f}-{max(rep['accuracy']):.4f}) | "
                     f"{rep['recall_mean']:.4f} ± {rep['recall_std']:.4f} ({min(rep['recall']):.4f}-{max(rep['recall']):.4f}) |")
    return "\n".join(lines) + "\n"


def plot_roc(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for r in rows:
        s, pos, tpr_at, fpr_at = r["_roc"]
        s, pos = np.asarray(s), np.asarray(pos, bool)
        order = np.argsort(-s, kind="mergesort")
        tpr = np.concatenate([[0], np.cumsum(pos[order]) / pos.sum()])
        fpr = np.concatenate([[0], np.cumsum(~pos[order]) / (~pos).sum()])
        line, = ax.plot(fpr, tpr, label=f"{Path(r['model']).name}: AUC {r['auc']:.3f}")
        ax.plot([fpr_at], [tpr_at], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity (disease recall)")
    ax.set_title("external set: ROC; dots = each file's own threshold")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="A lungedge .tflite file (repeatable).")
    ap.add_argument("--data", required=True, help="Labelled folder DATA/<class>/<image>.")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="Seed of the (first) cross-fit's folds.")
    ap.add_argument("--repeats", type=int, default=20,
                    help="Fold draws (seeds --seed, --seed+1, ...) over which the cross-fit's mean and spread are "
                         "reported: one draw of the folds is one sample of its result.")
    ap.add_argument("--out", required=True, help="Folder for the JSON, markdown and ROC plot.")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.folds < 2:
        ap.error("--repeats must be >= 1 and --folds >= 2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in a.model:
        print(f"evaluating {m} ...", file=sys.stderr)
        rows.append(evaluate_file(m, a.data, a.target_recall, a.folds, a.seed, a.repeats))
    plot_roc(rows, out / "external_dev_roc.png")
    text = markdown(rows, a.data)
    (out / "external_dev.md").write_text(text)
    (out / "external_dev.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "_roc"} for r in rows], indent=2))
    print(text)
    print(f"wrote {out / 'external_dev.md'}, external_dev.json, external_dev_roc.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
