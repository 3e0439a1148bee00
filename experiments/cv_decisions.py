"""Decision rules and ensembles on the folds of cross-validation runs: is the error in the
threshold or in the features?

    python experiments/cv_decisions.py --run runs/ct2-cv5 [--run runs/ct8-clahe-cv5 ...] --out runs/ct2-cv5/decisions

Each fold's saved model (``fold_K/model.keras``, Keras, as trained) classifies that fold's
validation and test parts (from its ``split_manifest.csv``; images from the fold's training data
folder). On each fold's test part, for each run and, with several runs, for their average:

- ``argmax``: the most probable class;
- ``recorded threshold``: the run's own decision rule (the threshold in its ``spec.json``);
- ``flip TTA``: the recorded rule on the mean of the image's and its mirror image's probabilities;
- ``rarest-class boost``: the recorded rule after multiplying the probability of the class rarest
  in training by a factor in [1, 20] chosen on the fold's validation part (best macro recall; the
  smallest such factor), i.e. a prior shift chosen without the test part.

Prints one row per rule with accuracy mean ± std over folds, the rarest class's recall mean ±
std and per fold; writes ``cv_decisions.json`` and ``cv_decisions.md`` to ``--out``. Runs being
averaged must share their folds (the same manifests). A training-side analysis (Keras models), so
it lives in ``train``; needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

from lungedge.edge_runtime.errors import ConfigError, LungedgeError

from lungedge.train.runfolder import MANIFEST, METRICS, read_manifest

BOOSTS = np.exp(np.linspace(0.0, np.log(20.0), 40))


def fold_dirs(run: Path) -> list:
    folds = sorted((p for p in run.glob("fold_*") if (p / "model.keras").is_file()), key=lambda p: int(p.name[5:]))
    if not folds:
        raise ConfigError(f"no fold_K/model.keras in {str(run)!r} (a `lungedge train --cv K` run folder)")
    return folds


def fold_outputs(fold: Path) -> dict:
    """Probabilities of the fold's val and test images, plain and mirrored, with labels, parts and
    the manifest's rows (read once)."""
    from lungedge.edge_runtime.preprocess import preprocess

    from lungedge.train.keras_eval import load_run_model

    model, spec, _ = load_run_model(str(fold))
    try:
        data = Path(json.loads((fold / METRICS).read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(fold / METRICS)!r} does not name the fold's data folder (a `lungedge train --cv K` "
                          f"fold): {type(exc).__name__}: {exc}") from None
    every = read_manifest(fold / MANIFEST)
    rows = [r for r in every if r["split"] in ("val", "test")]
    train_counts = collections.Counter(r["label"] for r in every if r["split"] == "train")
    if not rows or not train_counts:
        raise ConfigError(f"{str(fold / MANIFEST)!r} lists no training images or no val/test images: "
                          "not a cross-validation fold")
    unknown = sorted({r["label"] for r in every} - set(spec.labels))
    if unknown:
        raise ConfigError(f"{str(fold / MANIFEST)!r} has labels the fold's model does not: {unknown}")
    x = np.stack([preprocess(str(data / r["path"]), spec.preprocessing) for r in rows])
    labels = list(spec.labels)
    return {
        "manifest": sorted((r["path"], r["label"], r["split"]) for r in every),
        "p": np.asarray(model.predict(x, batch_size=32, verbose=0), dtype=np.float64),
        "p_flip": np.asarray(model.predict(x[:, :, ::-1, :], batch_size=32, verbose=0), dtype=np.float64),
        "y": np.array([labels.index(r["label"]) for r in rows]),
        "test": np.array([r["split"] == "test" for r in rows]),
        "labels": labels,
        "threshold": spec.threshold,
        "rarest": labels.index(min(train_counts, key=train_counts.get)),
    }


def _decide(probs, out):
    from lungedge.edge_runtime.decision import decide

    return decide(probs, out["labels"], out["threshold"])


def _macro_recall(y, pred, n):
    return float(np.mean([(pred[y == k] == k).mean() for k in range(n) if (y == k).any()]))


def _boosted(probs, out):
    """The recorded rule after the rarest-class factor chosen on the validation part."""
    val, r, n = ~out["test"], out["rarest"], len(out["labels"])
    best, factor = -1.0, 1.0
    for w in BOOSTS:
        q = probs.copy()
        q[:, r] *= w
        score = _macro_recall(out["y"][val], _decide(q[val], out), n)
        if score > best + 1e-12:
            best, factor = score, float(w)
    q = probs.copy()
    q[:, r] *= factor
    return _decide(q, out), factor


RULES = {
    "argmax": lambda p, pf, out: (p.argmax(axis=1), None),
    "recorded threshold": lambda p, pf, out: (_decide(p, out), None),
    "flip TTA": lambda p, pf, out: (_decide((p + pf) / 2.0, out), None),
    "rarest-class boost": lambda p, pf, out: _boosted(p, out),
}


def score(name: str, per_fold: list) -> dict:
    """Every rule on the test parts of ``per_fold`` [(p, p_flip, out), ...]."""
    rows = []
    for rule, fn in RULES.items():
        accs, rare, extra = [], [], []
        for p, pf, out in per_fold:
            pred, info = fn(p, pf, out)
            te, y, r = out["test"], out["y"], out["rarest"]
            accs.append(float((pred[te] == y[te]).mean()))
            rare.append(float((pred[te & (y == r)] == r).mean()))
            extra.append(info)
        rows.append({"models": name, "rule": rule, "accuracy_per_fold": accs, "rarest_recall_per_fold": rare,
                     "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                     "rarest_recall_mean": float(np.mean(rare)), "rarest_recall_std": float(np.std(rare)),
                     "boost_per_fold": extra if rule == "rarest-class boost" else None})
    return rows


def markdown(rows: list, rarest: str) -> str:
    lines = [f"| models | rule | accuracy, mean ± std (per fold) | recall of `{rarest}`, mean ± std (per fold) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['models']} | {r['rule']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} % "
                     f"({', '.join(f'{100 * a:.2f}' for a in r['accuracy_per_fold'])}) | "
                     f"{100 * r['rarest_recall_mean']:.1f} ± {100 * r['rarest_recall_std']:.1f} % "
                     f"({', '.join(f'{100 * a:.1f}' for a in r['rarest_recall_per_fold'])}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """The command line: one ``error:`` line and exit status 1 for a bad run folder."""
    ap = argparse.ArgumentParser(prog="python experiments/cv_decisions.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, type=Path, help="a `lungedge train --cv K` run folder (repeat to average runs)")
    ap.add_argument("--out", type=Path, help="folder for cv_decisions.json and cv_decisions.md")
    a = ap.parse_args(argv)
    try:
        report(a.run, a.out)
    except LungedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def report(run_dirs: list, out_dir=None) -> list:
    """Score every run of ``run_dirs`` (and their average), print the table, write it to ``out_dir``;
    the rows.

    Raises:
        ConfigError: a folder without fold models, or runs with different folds.
        ModelError: a fold model that cannot be loaded.
    """
    runs = []  # (name, [(fold name, manifest rows, outputs), ...]) in the order given
    run_dirs = [Path(r) for r in run_dirs]
    for run in run_dirs:
        folds = fold_dirs(run)
        print(f"{run}: {len(folds)} folds", flush=True)
        name = run.name if run.name not in [n for n, _ in runs] else f"{run.name} #{len(runs) + 1}"
        runs.append((name, [(f.name, o["manifest"], o) for f, o in ((f, fold_outputs(f)) for f in folds)]))
    first_name, first = runs[0]
    for name, folds in runs[1:]:
        if [(f, m) for f, m, _ in folds] != [(f, m) for f, m, _ in first]:
            raise ConfigError(f"{name!r} has other folds than {first_name!r}: runs averaged must share their manifests")
    rows = []
    for name, folds in runs:
        rows += score(name, [(o["p"], o["p_flip"], o) for _, _, o in folds])
    if len(runs) > 1:
        per_fold = []
        for i, (_, _, o) in enumerate(first):
            p = np.mean([folds[i][2]["p"] for _, folds in runs], axis=0)
            pf = np.mean([folds[i][2]["p_flip"] for _, folds in runs], axis=0)
            per_fold.append((p, pf, o))
        rows += score(" + ".join(n for n, _ in runs) + " (mean probabilities)", per_fold)
    rarest = first[0][2]["labels"][first[0][2]["rarest"]]
    table = markdown(rows, rarest)
    print(table)
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "cv_decisions.json").write_text(json.dumps({"runs": [str(r) for r in run_dirs], "rarest_class": rarest,
                                                             "rows": rows}, indent=2))
        (out_dir / "cv_decisions.md").write_text(f"# Decision rules on the folds of {', '.join(n for n, _ in runs)}\n\n"
                                               "Each fold's test part; the boost factor is chosen on the fold's "
                                               "validation part (command: `python experiments/cv_decisions.py "
                                               + " ".join(f"--run {r}" for r in run_dirs) + "`).\n\n" + table)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
