"""Which domain score refuses images a lung model was not built for? Methods measured against each other.

Before a score goes into every model file, measure the candidates on the
development sets of ``../shared`` (the held-back sets judge the result, so nothing here is tuned on
them). Features come from MobileNetV2 with the ImageNet weights every recipe starts from (the
frozen base of the paper recipes); the fine-tuned recipes change the features, so this ranks
methods, it does not fix their numbers.

For each direction (X-ray model, CT model) the in-domain images are split three ways: *fit* (means
and covariance), *val* (the acceptance threshold: its 99th percentile, as a conversion would take it
from a run's validation split) and *test* (in-domain refusal). For X-ray, the external dev set
(``chest_xray_test_dev``) is a second in-domain test. Out-of-domain sets: the other modality, the
12 photos of ``ood_dev``, generated frames (blank, grey, noise, gradients, checkerboards) and
transformed in-domain test images (inverted, rotated 90 degrees, upside down).

Scores compared (higher = less like the training images):
  msp         1 - max softmax of a logistic head on the pooled features (what the model says today)
  energy      -logsumexp of that head's logits
  maha-emp    class-conditional Mahalanobis, empirical shared covariance (biased in-sample)
  maha-lw     the same with Ledoit-Wolf shrinkage
  maha-pcaK   Mahalanobis in the top-K principal components of the fit features (whitened)
  ...@layer   the same on another layer: the pooled 1280-d output (``out``), the 320-d block 16
              projection (``b16``), and spatial grids that keep where things are (``b16g2``: b16
              averaged over a 2x2 grid, 1280-d), because a global average cannot see a rotation

Run:  python experiments/domain_methods.py --out /work/runs/domain   (about 10 minutes on 2 cores)
Writes ``results.json``, ``results.md`` and ``scores.png`` (score distributions of the best method).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("LUNGEDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SIZE = 224


def _images(folder: Path, limit: int, seed: int) -> list:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    random.Random(seed).shuffle(files)
    return files[:limit] if limit else files


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)


def generated_frames(seed: int = 0) -> dict:
    """Frames nobody should get a diagnosis for: blank, grey levels, noise, gradients, checkerboards."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in (0, 255, 64, 128, 192):
        out[f"flat{v}"] = np.full((SIZE, SIZE, 3), v, np.uint8)
    for i in range(4):
        out[f"noise{i}"] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        g = rng.normal(128, 20 + 20 * i, (SIZE, SIZE, 1)).clip(0, 255).astype(np.uint8)
        out[f"gnoise{i}"] = np.repeat(g, 3, 2)
    ramp = np.linspace(0, 255, SIZE).astype(np.uint8)
    out["hgrad"] = np.repeat(np.tile(ramp, (SIZE, 1))[..., None], 3, 2)
    out["vgrad"] = np.repeat(np.tile(ramp[:, None], (1, SIZE))[..., None], 3, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out["radial"] = np.repeat((255 * np.hypot(yy - SIZE / 2, xx - SIZE / 2) / (SIZE * 0.71)).clip(0, 255).astype(np.uint8)[..., None], 3, 2)
    for cell in (4, 8, 16, 32, 56):
        cb = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
        out[f"checker{cell}"] = np.repeat(cb[..., None], 3, 2)
    return out


def transformed(images: np.ndarray) -> dict:
    return {"inverted": 255 - images, "rot90": np.rot90(images, 1, axes=(1, 2)).copy(),
            "upside-down": images[:, ::-1].copy()}


class Features:
    """MobileNetV2 (ImageNet weights from ../shared) with the layers the methods read."""

    def __init__(self):
        import keras

        weights = SHARED / "models/mobilenet_v2_imagenet/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
        base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False, weights=str(weights))
        outs = [base.get_layer("block_16_project_BN").output, base.output]
        self.model = keras.Model(base.input, outs)

    def __call__(self, images: np.ndarray, batch: int = 32) -> dict:
        parts = {"out": [], "b16": [], "b16g2": []}
        for i in range(0, len(images), batch):
            x = images[i:i + batch].astype(np.float32) / 127.5 - 1.0
            b16, out = (np.asarray(t) for t in self.model(x, training=False))
            parts["out"].append(out.mean(axis=(1, 2)))
            parts["b16"].append(b16.mean(axis=(1, 2)))
            n, h, w, c = b16.shape  # 7x7 -> 2x2 grid (rows/cols 0-3 and 3-6 overlap on the middle line)
            g = np.stack([b16[:, r0:r0 + 4, c0:c0 + 4].mean(axis=(1, 2)) for r0 in (0, 3) for c0 in (0, 3)], 1)
            parts["b16g2"].append(g.reshape(n, -1))
        return {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}


class Maha:
    """Class-conditional means, one shared covariance; score = the smallest squared distance."""

    def __init__(self, X, y, shrink: str = "lw", k: int = 0):
        from sklearn.covariance import EmpiricalCovariance, LedoitWolf

        self.mean = X.mean(0)
        Xc = X - self.mean
        self.P = None
        if k:
            _, s, vt = np.linalg.svd(Xc, full_matrices=False)
            self.P = vt[:k].T
            Xc = Xc @ self.P
        self.mus = np.stack([Xc[y == c].mean(0) for c in np.unique(y)])
        resid = Xc - self.mus[np.searchsorted(np.unique(y), y)]
        cov = (LedoitWolf() if shrink == "lw" else EmpiricalCovariance()).fit(resid).covariance_
        self.prec = np.linalg.pinv(cov)

    def score(self, X):
        Z = X - self.mean
        if self.P is not None:
            Z = Z @ self.P
        d = [np.einsum("ij,jk,ik->i", Z - m, self.prec, Z - m) for m in self.mus]
        return np.min(np.stack(d, 1), 1)


class Head:
    """A logistic head on the pooled features: the softmax a classifier would give."""

    def __init__(self, X, y):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.sc = StandardScaler().fit(X)
        self.lr = LogisticRegression(max_iter=2000, C=0.1).fit(self.sc.transform(X), y)

    def logits(self, X):
        z = self.lr.decision_function(self.sc.transform(X))
        return np.stack([-z / 2, z / 2], 1) if z.ndim == 1 else z

    def msp(self, X):
        z = self.logits(X)
        p = np.exp(z - z.max(1, keepdims=True))
        return 1 - (p / p.sum(1, keepdims=True)).max(1)

    def energy(self, X):
        z = self.logits(X)
        m = z.max(1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(1)))


def _auroc(inside, outside) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def run_direction(name, feats, in_sets, out_sets, labels_fit):
    """feats: dict set-name -> dict layer -> features. in_sets: names of the in-domain test sets."""
    methods = {}
    for layer in ("out", "b16", "b16g2"):
        X = feats["fit"][layer]
        methods[f"maha-emp@{layer}"] = Maha(X, labels_fit, "emp").score
        methods[f"maha-lw@{layer}"] = Maha(X, labels_fit, "lw").score
        for k in (32, 128):
            if k < X.shape[1]:
                methods[f"maha-pca{k}@{layer}"] = Maha(X, labels_fit, "lw", k).score
    head = Head(feats["fit"]["out"], labels_fit)
    methods["msp@out"] = lambda X, h=head: h.msp(X)
    methods["energy@out"] = lambda X, h=head: h.energy(X)
    rows = {}
    for m, fn in methods.items():
        layer = m.split("@")[1]
        s = {k: fn(v[layer]) for k, v in feats.items() if k != "fit"}
        th = float(np.percentile(s["val"], 99))
        row = {"threshold": th}
        for k in in_sets:
            row[f"refused {k}"] = float(np.mean(s[k] > th))
        inside = np.concatenate([s[k] for k in in_sets])
        for k in out_sets:
            row[f"refused {k}"] = float(np.mean(s[k] > th))
            row[f"auroc {k}"] = _auroc(inside, s[k])
        row["_scores"] = {k: v.tolist() for k, v in s.items()}
        rows[m] = row
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fit", type=int, default=900, help="in-domain images to fit on (per direction)")
    ap.add_argument("--val", type=int, default=400, help="in-domain images the threshold is taken from")
    ap.add_argument("--test", type=int, default=300, help="in-domain test images")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fx = Features()
    xr = _images(SHARED / "data/chest_xray/train", a.fit + a.val + a.test, a.seed)
    ct = _images(SHARED / "data/iq_othnccd", 0, a.seed)
    nf, nv = min(a.fit, 450), min(a.val, 200)
    ct_fit, ct_val, ct_test = ct[:nf], ct[nf:nf + nv], ct[nf + nv:nf + nv + a.test]
    photos = _images(SHARED / "data/ood_dev/photos", 0, 0)
    dev = _images(SHARED / "data/chest_xray_test_dev", 0, 0)

    def load(paths):
        return np.stack([_load(p) for p in paths])

    def cls(paths):
        return np.array([p.parent.name for p in paths])

    def F(arr, what):
        t = time.time()
        f = fx(arr)
        print(f"  features of {len(arr)} {what}: {time.time() - t:.0f} s", flush=True)
        return f

    gen = generated_frames(a.seed)
    gen_arr = np.stack(list(gen.values()))
    xr_fit, xr_val, xr_test = xr[:a.fit], xr[a.fit:a.fit + a.val], xr[a.fit + a.val:]
    xr_test_arr = load(xr_test)
    ct_test_arr = load(ct_test)
    common = {"photos": F(load(photos), "photos"), "generated": F(gen_arr, "generated frames")}
    xray_feats = {"fit": F(load(xr_fit), "X-ray fit"), "val": F(load(xr_val), "X-ray val"),
                  "test": F(xr_test_arr, "X-ray test"), "dev": F(load(dev), "X-ray dev (external)")}
    ct_feats = {"fit": F(load(ct_fit), "CT fit"), "val": F(load(ct_val), "CT val"), "test": F(ct_test_arr, "CT test")}
    xray_out = {"ct": F(load(ct[-min(400, a.test + 100):]), "CT as out-of-domain"), **common}
    for k, v in transformed(xr_test_arr).items():
        xray_out[f"xray-{k}"] = F(v, f"X-rays {k}")
    ct_out = {"xray": F(np.concatenate([xr_test_arr, load(dev)]), "X-rays as out-of-domain"), **common}
    for k, v in transformed(ct_test_arr).items():
        ct_out[f"ct-{k}"] = F(v, f"CT {k}")
    results = {
        "xray": run_direction("xray", {**xray_feats, **xray_out}, ["test", "dev"], list(xray_out), cls(xr_fit)),
        "ct": run_direction("ct", {**ct_feats, **ct_out}, ["test"], list(ct_out), cls(ct_fit)),
        "sizes": {"xray": {k: len(next(iter(v.values()))) for k, v in {**xray_feats, **xray_out}.items()},
                  "ct": {k: len(next(iter(v.values()))) for k, v in {**ct_feats, **ct_out}.items()}},
        "seconds": round(time.time() - t0),
    }
    (a.out / "results.json").write_text(json.dumps(results))
    lines = [f"# Domain scores compared (`python experiments/domain_methods.py --out {a.out}`, seed {a.seed})", ""]
    for d in ("xray", "ct"):
        r = results[d]
        cols = [c for c in next(iter(r.values())) if c not in ("_scores", "threshold")]
        lines += [f"## {d} model: sizes {results['sizes'][d]}", "",
                  "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m, row in r.items():
            lines.append(f"| {m} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        lines.append("")
    (a.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    _plot(results, a.out / "scores.png")
    print(f"done in {time.time() - t0:.0f} s: {a.out}")
    return 0


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, d in zip(axes, ("xray", "ct")):
        r = results[d]
        best = max((m for m in r if m.startswith("maha")),
                   key=lambda m: min(v for k, v in r[m].items() if k.startswith("auroc")))
        sc = r[best]["_scores"]
        lo = min(min(v) for v in sc.values())
        bins = np.logspace(np.log10(max(lo, 1e-3)), np.log10(max(max(v) for v in sc.values())), 60)
        for k, v in sc.items():
            ax.hist(np.maximum(v, bins[0]), bins=bins, histtype="step", label=k, density=True)
        ax.axvline(r[best]["threshold"], color="k", ls="--", label="threshold (val p99)")
        ax.set_xscale("log")
        ax.set_title(f"{d} model: {best}")
        ax.set_xlabel("domain score (squared distance)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
