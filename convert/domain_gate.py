"""The domain gate at conversion: fit the score on a run, choose each file's acceptance threshold
on its own validation scores, and measure its refusal rates (``convert.conversion`` calls these).

The development out-of-domain sets need no data beyond the run's own: generated frames (blank,
grey, noise, gradients, checkerboards) and the validation images inverted, turned 90 degrees
and upside down; ``extra_sets`` adds labelled folders of other images (other modality, photos).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from lungedge.edge_runtime.domain import DomainGate, refused_share, threshold_from
from lungedge.edge_runtime.metadata import embed_spec, read_spec

from .calibration import load_images
from .domain import DomainFit, extract, feature_layers, feature_model, fit, layer_widths, split_for_fit


def fit_run(run, model, picked: Sequence[int], seed: int, reference_x=None):
    """(DomainFit, frame facts) fitted on the run's training images other than a holdout of
    ``picked`` (the calibration images), or (None, reason) when the model has no place for a
    score. The frame facts are the training images' aspect range and structure floor
    (``edge_runtime.domain``), for the checks before the model."""
    from lungedge.edge_runtime.preprocess import image_size
    from lungedge.train.runfolder import calibration_split

    from .domain import _base_and_pool

    parts = _base_and_pool(model)
    if parts is None:
        return None, "the model is not base -> pooling -> head: no domain score"
    layers = feature_layers(parts[0], recipe_domain_layers(run))
    fm = feature_model(model, layers)
    train = calibration_split(run)
    idx = split_for_fit(len(train), picked, seed)
    paths = [train.paths[i] for i in idx]
    x, kept, _ = load_images(paths, run.spec.preprocessing, desc="domain fit images")
    if len(x) < 2:
        return None, f"only {len(x)} training images could be read for the domain score"
    feats = extract(fm, x)
    labels = [train.labels[idx[k]] for k in kept]
    aspects = []
    for k in kept:
        try:
            w, h = image_size(paths[k])
            aspects.append(w / h)
        except Exception:  # a file that read once and not twice: its aspect is not needed
            continue
    from lungedge.edge_runtime.domain import (saturated_share, saturation_limit_from, structure,
                                              structure_floor_from)

    facts = {"aspect_range": (float(min(aspects)), float(max(aspects))) if aspects else None,
             "structure_floor": structure_floor_from([structure(p) for p in x.pixels]),
             "saturation_limit": saturation_limit_from([saturated_share(p) for p in x.pixels])}
    fitted = fit(feats, labels, run.spec.num_classes, layers, layer_widths(model, layers))
    if reference_x is not None and len(reference_x):  # unseen images: where the anchor goes
        fitted = fitted.anchored(fitted.scores(extract(fm, reference_x, desc="domain reference")))
    return fitted, facts


def recipe_domain_layers(run):
    """The layers the run's recipe (its ``recipe.json``) asks the score to read; the recipe
    default for a run folder without one."""
    import json

    from lungedge.train.recipes import Recipe
    from lungedge.train.runfolder import RECIPE

    path = Path(run.path) / RECIPE
    stored = json.loads(path.read_text()).get("domain_layers") if path.is_file() else None
    return Recipe(name="default", domain_layers=stored).domain_layers if stored else Recipe(name="default").domain_layers


def file_scores(path, x) -> np.ndarray:
    """The file's own domain scores of preprocessed images ``x`` (no refusal, no checks)."""
    from lungedge.edge_runtime.classifier import Classifier

    with Classifier(path, use_threshold=False, domain_gate=False, guard=False) as clf:
        return np.asarray([clf.predict_with_score(np.asarray(x[i], np.float32))[1] for i in range(len(x))])


def score_ceiling(path) -> Optional[float]:
    """The largest score an integer file's output can hold (its quantised range), None for float."""
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.quant import tensor_quantization

    with Classifier(path, use_threshold=False, domain_gate=False, guard=False) as clf:
        details = clf._score_out
        q = tensor_quantization(details) if details is not None else None
        if q is None:
            return None
        top = 255 if np.dtype(details["dtype"]) == np.uint8 else 127
        return float((top - q[1]) * q[0])


def benign_variants(pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """One variation of each image (N, H, W, C uint8) of the kind a site's own images of the
    same sort differ by from a dataset's stored copies: another resize path (a window of 92-100 %
    of the side at aspect 0.9-1.1; downscaled by 0.5-1 with a box filter and back, bilinear) and
    exposure (gamma 0.95-1.05). Not rotations, inversions or flips: those the gate must refuse.

    Measured on an X-ray int8 file (``xray-pneumonia-plus``, 2 fine-tuning epochs): threshold 1.91 on
    the validation images alone, 2.29 with these variations; full-resolution originals of the
    training hospital refused 5 -> 1 of 24, inverted X-rays 99.0 -> 95.5 %, the test split
    1.75 -> 0.5 %. Stronger variations (crop 85 %, aspect 0.8-1.25, 5 degree rotation, contrast and
    brightness) gave 3.00 and inverted X-rays 73.8 %: too loose."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n, h, w, c = pixels.shape
    out = np.empty_like(pixels)
    for i in range(n):
        img = Image.fromarray(pixels[i][:, :, 0] if c == 1 else pixels[i])
        scale, aspect = rng.uniform(0.92, 1.0), rng.uniform(0.9, 1.1)
        cw, ch = min(w, int(round(w * scale * np.sqrt(aspect)))), min(h, int(round(h * scale / np.sqrt(aspect))))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        k = rng.uniform(0.5, 1.0)
        img = img.resize((max(8, int(w * k)), max(8, int(h * k))), Image.Resampling.BOX)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        a = np.clip((np.asarray(img, np.float32) / 255.0) ** rng.uniform(0.95, 1.05), 0, 1)
        a = (a * 255 + 0.5).astype(np.uint8)
        out[i] = a[:, :, None] if c == 1 else a
    return out


def choose_threshold(path, val_x) -> tuple:
    """(threshold, the file's scores of ``val_x``, of their benign variations, of their negatives)."""
    from .calibration import NormalizedImages

    scores = file_scores(path, val_x)
    pixels = getattr(val_x, "pixels", None)
    varied, inverse = np.zeros(0), np.zeros(0)
    if pixels is not None and len(pixels):
        varied = file_scores(path, NormalizedImages(benign_variants(np.asarray(pixels)), val_x.spec))
        inverse = file_scores(path, NormalizedImages(255 - np.asarray(pixels), val_x.spec))
    return threshold_from(np.concatenate([scores, varied])), scores, varied, inverse


def polarity_decision(scores: np.ndarray, inverse: np.ndarray, threshold: float) -> tuple:
    """(on, record): whether the file gets the polarity check, from its validation images' scores
    and their negatives': on when it refuses at most ``POLARITY_MAX_REFUSAL`` of the images; the
    record says what it refused and what it caught (negatives the score let through)."""
    from lungedge.edge_runtime.domain import POLARITY_MAX_REFUSAL, polarity_refusals

    if not len(inverse):
        return True, {"measured": False}
    wrong = float(np.mean(polarity_refusals(scores, inverse, threshold)))
    passed = inverse <= threshold  # negatives the score alone accepts; inverted back they are the originals
    caught = polarity_refusals(inverse[passed], scores[passed], threshold)
    record = {"measured": True, "images": int(len(scores)), "validation_refused": wrong,
              "negatives_passing_the_score": float(np.mean(passed)),
              "of_those_caught": float(np.mean(caught)) if passed.any() else None,
              "max_refusal": POLARITY_MAX_REFUSAL}
    return wrong <= POLARITY_MAX_REFUSAL, record


def set_threshold(path, data: bytes, domain: DomainFit, facts: dict, val_x, source: str) -> tuple:
    """(bytes with the gate in the record, note): the threshold at the split-conformal 99th
    percentile of the file's own scores on ``val_x`` and on one benign variation of each
    (``benign_variants``): the gate must take a site's own images of the kind it was built for
    (without the variations, 5 of 24 full-resolution Kermany originals, resized by the device,
    scored above a threshold chosen on the dataset's stored copies)."""
    threshold, scores, varied, inverse = choose_threshold(path, val_x)
    polarity, polarity_record = polarity_decision(scores, inverse, threshold)
    ceiling = score_ceiling(path)
    fit_record = domain.record()
    fit_record["polarity"] = polarity_record
    if ceiling is not None:
        fit_record["score_ceiling"] = ceiling
    gate = DomainGate(threshold=threshold, layer=domain.layer, dimension=domain.dim,
                      chosen_on=f"{source}: {len(scores)} images and one benign variation of each, split-conformal "
                                f"99th percentile of this file's scores",
                      aspect_range=facts.get("aspect_range"), structure_floor=facts.get("structure_floor"),
                      saturation_limit=facts.get("saturation_limit"), polarity=polarity,
                      refusal={"validation": refused_share(scores, threshold),
                               **({"validation, benign variations": refused_share(varied, threshold)} if len(varied) else {})},
                      fit=fit_record)
    spec = read_spec(data).replace(domain=gate)
    note = f"domain threshold {threshold:.4g} ({source}, {len(scores)} images)"
    if not polarity:
        note += (f"; polarity check off (it refused {100 * polarity_record['validation_refused']:.1f} % of the "
                 f"validation images as negatives: the model's features do not tell an image from its negative)")
    if ceiling is not None and threshold >= ceiling:
        note += f"; WARNING: at the integer output's ceiling {ceiling:.4g}, out-of-domain images cannot score above it"
    return embed_spec(data, spec), note


# ---- development out-of-domain sets -----------------------------------------------------
def generated_frames(h: int, w: int, channels: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """20 frames no model of ours was built for, uint8 (h, w, channels)."""
    rng = np.random.default_rng(seed)
    frames = {}
    for v in (0, 64, 128, 192, 255):
        frames[f"constant {v}"] = np.full((h, w), v, np.uint8)
    for i in range(3):
        frames[f"uniform noise {i}"] = rng.integers(0, 256, (h, w), dtype=np.uint8)
        frames[f"gaussian noise {i}"] = np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    frames["gradient horizontal"] = (255 * xx / max(w - 1, 1)).astype(np.uint8)
    frames["gradient vertical"] = (255 * yy / max(h - 1, 1)).astype(np.uint8)
    frames["gradient diagonal"] = (255 * (xx + yy) / max(w + h - 2, 1)).astype(np.uint8)
    frames["radial"] = (255 * np.clip(np.hypot(xx - w / 2, yy - h / 2) / (min(h, w) / 2), 0, 1)).astype(np.uint8)
    for i, cell in enumerate((4, 16, 32, 64)):
        frames[f"checkerboard {cell}"] = (255 * (((xx // cell) + (yy // cell)) % 2)).astype(np.uint8)
    frames["stripes"] = (255 * ((xx // 8) % 2)).astype(np.uint8)
    return {k: np.repeat(v[:, :, None], channels, axis=2) for k, v in frames.items()}


def transformed(pixels: np.ndarray) -> Dict[str, np.ndarray]:
    """The images (N, H, W, C) inverted, turned 90 degrees and upside down."""
    return {"inverted": 255 - pixels, "rotated 90": np.rot90(pixels, 1, axes=(1, 2)).copy(),
            "upside down": pixels[:, ::-1].copy()}


def folder_sets(root: Optional[str], spec) -> Dict[str, list]:
    """``{name: [paths]}`` for each subfolder of ``root`` (each a development out-of-domain set)."""
    if not root:
        return {}
    from lungedge.edge_runtime.image_files import expand_inputs

    out = {}
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        paths = [p for p, problem in expand_inputs([str(sub)]) if not problem]
        if paths:
            out[sub.name] = paths
    return out


def refusal_rates(path, val_pixels: Optional[np.ndarray], spec, extra_sets: Optional[Dict[str, list]] = None,
                  limit: int = 300) -> Dict[str, dict]:
    """``{set: {"n", "refused"}}``: the file's refusals (checks before the model included) on the
    development sets: generated frames, transformed validation images, ``extra_sets`` folders."""
    from lungedge.edge_runtime.classifier import Classifier, Failure, Refusal

    p = spec.preprocessing
    sets: Dict[str, list] = {"generated frames": list(generated_frames(p.height, p.width, p.channels).values())}
    if val_pixels is not None and len(val_pixels):
        for name, arr in transformed(np.asarray(val_pixels[:limit])).items():
            sets[f"validation {name}"] = list(arr)
    for name, paths in (extra_sets or {}).items():
        sets[name] = list(paths[:limit])
    out = {}
    with Classifier(path, guard=False) as clf:
        for name, items in sets.items():
            results = list(clf.classify_many(items, workers=0)) if items and not isinstance(items[0], np.ndarray) \
                else [_one(clf, a) for a in items]
            used = [r for r in results if isinstance(r, Refusal) or not isinstance(r, Failure)]
            refused = sum(isinstance(r, Refusal) for r in used)
            out[name] = {"n": len(used), "refused": refused / len(used) if used else None}
    return out


def _one(clf, array: np.ndarray):
    from lungedge.edge_runtime.classifier import Failure
    from lungedge.edge_runtime.errors import ImageError, OutputError

    try:
        return clf.classify(array)
    except (ImageError, OutputError) as exc:
        return Failure("<array>", str(exc))
