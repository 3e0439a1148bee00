"""How often does a from-scratch recipe learn? Train it on generated demo images over many seeds.

Each seed generates its own set (``lungedge.demo_data``, seed s) and trains with recipe seed s, so
both the data and the initial weights and shuffling change: a recipe at the edge of learning shows
up here as seeds that stay at the majority-class rate, whatever the CPU.

    python experiments/scratch_seeds.py --per-class 600 --seeds 0-9 --out runs/seeds-600
    python experiments/scratch_seeds.py --per-class 2000 --seeds 0-9 --set epochs=9 --out runs/seeds-2000

Writes ``OUT/seeds.json`` and ``OUT/seeds.md`` (one row per seed: test accuracy, the validation
accuracy of every epoch, seconds) and prints the count of seeds that learned.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _seeds(text: str) -> list:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="demo-scratch")
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--size", type=int, default=64, help="generated image size (px)")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lungedge.demo_data import make_demo_dataset
    from lungedge.train.recipes import get_recipe
    from lungedge.train.training import train_run

    overrides = dict(kv.split("=", 1) for kv in args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in _seeds(args.seeds):
        recipe = get_recipe(args.recipe, seed=s, **{k: _value(v) for k, v in overrides.items()})
        data = make_demo_dataset(out / f"data-{s}", per_class=args.per_class, size=args.size, seed=s)
        run = out / f"run-{s}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        train_run(recipe, str(data), str(run), learning_floor=False)
        seconds = time.perf_counter() - t0
        m = json.loads((run / "metrics.json").read_text())
        hist = (run / "history.csv").read_text().splitlines()
        head = hist[0].split(",")
        col = {k: [round(float(r.split(",")[head.index(k)]), 3) for r in hist[1:]] for k in head
               if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
        val = col.get("val_accuracy", [])
        floor = m.get("learning_floor", {})
        rows.append({"seed": s, "accuracy": m["test"]["accuracy"] if "test" in m else m.get("accuracy"),
                     "learned": floor.get("status") == "learned", "val_accuracy": val, "seconds": round(seconds, 1),
                     "history": col})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    learned = sum(r["learned"] for r in rows)
    summary = {"recipe": args.recipe, "overrides": overrides, "per_class": args.per_class, "size": args.size,
               "learned": learned, "seeds": len(rows), "rows": rows}
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# {args.recipe} over {len(rows)} seeds, {args.per_class} images per class at {args.size} px",
             "", f"Overrides: {overrides or 'none'}. Learned (learning floor): **{learned} of {len(rows)}**.", "",
             "| seed | test accuracy | learned | val accuracy by epoch | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['accuracy']:.4f} | {r['learned']} | {' '.join(map(str, r['val_accuracy']))} | "
              f"{r['seconds']} |" for r in rows]
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print(f"learned: {learned} of {len(rows)}")
    return 0 if learned == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
