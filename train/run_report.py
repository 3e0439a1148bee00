"""Run reports: history CSV, plots (training curves, confusion matrix, ROC) and the model card."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from lungedge.edge_runtime.atomic_write import atomic_write_bytes, atomic_write_text

from .recipes import customisations

#: The published result for each declared modality's task: (the paper's recipe, its numbers).
PAPERS = {
    "X-ray": ("xray-pneumonia", "accuracy 95.40 %, precision 95.62 %, recall 95.40 %, F1 95.46 % (75/15/10 random split)"),
    "CT": ("ct-lung-cancer", "test accuracy 97 % (70/15/15), stratified 5-fold CV 97.26 ± 0.66 % (population std)"),
}

HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def write_history(path: Path, rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in HISTORY_COLUMNS})
    atomic_write_text(str(path), buf.getvalue())


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(str(path), buf.getvalue())


def plot_history(path: Path, rows: List[dict], title: str, restored_epoch=None) -> None:
    """Loss and accuracy per epoch (train and validation), with the restored epoch marked."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [r["epoch"] for r in rows]
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(ep, [r.get(key) for r in rows], "o-", label=f"train {key}")
        ax.plot(ep, [r.get(f"val_{key}") for r in rows], "o-", label=f"val {key}")
        phases = [r.get("phase") for r in rows]
        for i in range(1, len(rows)):
            if phases[i] != phases[i - 1]:
                ax.axvline(ep[i] - 0.5, color="grey", ls="--", lw=1)
                ax.text(ep[i] - 0.4, ax.get_ylim()[1], " fine-tune", va="top", fontsize=8, color="grey")
        if restored_epoch is not None:
            ax.axvline(restored_epoch, color="tab:green", ls=":", lw=1.5, label=f"restored (epoch {restored_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss" if key == "loss" else "accuracy (fraction correct)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(path: Path, cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> None:
    plt = _figure()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(class_names), 1.2 + 1.1 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=20, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def plot_roc(path: Path, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """One-vs-rest ROC curve per class (scikit-learn ``roc_curve``)."""
    from sklearn.metrics import auc, roc_curve

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for i in classes:
        pos = np.asarray(y_true) == i
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, i])
        ax.plot(fpr, tpr, label=f"{class_names[i]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def model_card(
    recipe, spec, counts: Dict[str, Dict[str, int]], metrics: dict, argmax_metrics: dict, val_metrics: dict,
    data_dir: str, failures: list, seconds: float, device: str, fixed_test: bool,
    verdict=None,
) -> str:
    """The model card (Markdown): model, data and split, test metrics, intended use, limitations."""
    lines = [f"# Model card: {recipe.name}", "", f"{recipe.description}", ""]
    changed = customisations(recipe)
    if changed:
        lines += ["**Changed from the named recipe** (the description above is the named recipe's): "
                  + "; ".join(f"`{k}` {a!r} -> {b!r}" for k, a, b in changed) + ".", ""]
    lines += _card_model(recipe, spec, seconds, device)
    lines += _card_data(recipe, spec, counts, data_dir, failures, fixed_test)
    lines += _card_metrics(recipe, spec, metrics, argmax_metrics, val_metrics, verdict)
    lines += _card_limitations(recipe, spec)
    return "\n".join(lines) + "\n"


def _card_model(recipe, spec, seconds: float, device: str) -> List[str]:
    names, th, pre = list(spec.labels), spec.threshold, spec.preprocessing
    training = (f"- Training: Adam {recipe.learning_rate}" + (" (cosine decay)" if recipe.lr_schedule == "cosine" else "")
                + f", batch {recipe.batch_size}, up to {recipe.epochs} epochs "
                + ("training the whole network from random initialisation" if recipe.from_scratch
                   else "with the base frozen")
                + (f", early stopping on {recipe.monitor} (patience {recipe.patience}, best weights restored)"
                   if recipe.patience else "")
                + (", class weights (balanced)" if recipe.class_weights else "")
                + ((", augmentation" + (" (fine-tuning only) " if recipe.augment_phases == "fine_tune" else " ")
                    + str(recipe.augmentation.__dict__)) if recipe.augmentation else ", no augmentation")
                + (f"; then {recipe.fine_tune.epochs} epochs fine-tuning the top {recipe.fine_tune.blocks} blocks "
                   f"(of 16; BatchNorm frozen) at {recipe.fine_tune.learning_rate}"
                   + (" with cosine decay" if recipe.fine_tune.lr_schedule == "cosine" else "")
                   + ("" if recipe.fine_tune.early_stopping else
                      f", moving average of the weights kept (time constant {recipe.fine_tune.ema_epochs:g} epochs)"
                      if recipe.fine_tune.ema_epochs else ", last epoch kept") if recipe.fine_tune.enabled else "")
                + f". Took {seconds / 60:.1f} min on {device}.")
    return [
        "## Model",
        f"- MobileNetV2 (alpha {recipe.alpha}, weights `{recipe.weights}`) base, head: GlobalAveragePooling2D"
        f"{f', Dense({recipe.head_units}, relu)' if recipe.head_units else ''}"
        f"{f', Dropout({recipe.dropout})' if recipe.dropout else ''}, Dense({len(names)}, softmax).",
        f"- Input {pre.height}x{pre.width} {pre.color_mode}, {pre.resize} resize, "
        + (f"{pre.contrast_text}, " if pre.contrast_text else "")
        + f"(pixel - {list(pre.mean)}) / "
        f"{list(pre.std)} (`edge_runtime.preprocess`, the same function the device uses).",
        f"- Output classes (in order): {', '.join(names)}.",
        training,
        "- Decision: " + (f"`{th.label}` when its probability >= {th.value:.4f} (chosen on the validation split for "
                          f"recall >= {th.target_recall}, rule {th.rule}), otherwise the most probable other class."
                          if th else "the most probable class (argmax)."),
        "",
    ]


_SPLIT_WORDS = {
    "grouped": "patient-grouped stratified",
    "blocked": "stratified, grouped in blocks of {block} consecutive slice numbers per class (a stand-in for patients)",
    "random": "stratified random per class",
}


def _card_data(recipe, spec, counts, data_dir: str, failures: list, fixed_test: bool) -> List[str]:
    names = list(spec.labels)
    lines = [
        "## Data and split",
        f"- Data: `{data_dir}`; {sum(sum(c.values()) for c in counts.values())} readable images"
        + (f", {len(failures)} unreadable left out (listed in metrics.json)" if failures else ", none unreadable") + ".",
        f"- Split: {_SPLIT_WORDS[recipe.split].format(block=recipe.split_block)} "
        f"{'/'.join(f'{f:.0%}' for f in recipe.fractions)} (train/val/test), seed {recipe.seed}"
        + ("; the test split is the dataset's own test folder" if fixed_test else "") + "; see `split_manifest.csv`.",
        "",
        "| split | " + " | ".join(names) + " | total |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for s in ("train", "val", "test"):
        c = counts.get(s, {})
        lines.append(f"| {s} | " + " | ".join(str(c.get(n, 0)) for n in names) + f" | {sum(c.values())} |")
    return lines


def _card_metrics(recipe, spec, metrics, argmax_metrics, val_metrics, verdict) -> List[str]:
    th = spec.threshold
    lines = ["", "## Test metrics", ""]
    if recipe.modality == "CT" and recipe.split == "random":
        lines += ["**Read this first: a random split of numbered CT slices puts neighbouring slices of one patient "
                  "in train and test, so the numbers below mostly measure recognising patients already seen** "
                  "(a nearest-slice lookup with no training scores about as well). Train with `--split blocked` "
                  "(the default of `ct-lung-cancer-plus`) for numbers closer to new patients; see Limitations.", ""]
    lines += ["Measured on this run's own test split: images from the same folder as the training images "
              "(in-folder), not from another hospital or time.", "",
             "| decision | accuracy | macro precision | macro recall | macro F1 | weighted F1 | AUC (macro; 95 % CI for two classes) |",
             "|---|---|---|---|---|---|---|"]
    for label, m in (("threshold" if th else "argmax", metrics), ("argmax", argmax_metrics if th else None),
                     ("validation (" + ("threshold" if th else "argmax") + ")", val_metrics)):
        if m is None:
            continue
        auc, ci = (m.get("auc") or {}).get("macro"), (m.get("auc") or {}).get("ci95")
        lines.append(f"| {label} | {m['accuracy']:.4f} | {m['macro']['precision']:.4f} | {m['macro']['recall']:.4f} | "
                     f"{m['macro']['f1']:.4f} | {m['weighted']['f1']:.4f} | "
                     + (f"{auc:.4f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + " |" if auc is not None else "n/a |"))
    if verdict is not None:
        lines += ["", f"Learning floor ({verdict.status}): {verdict.sentence()}."]
    paper = PAPERS.get(recipe.modality)
    if paper:
        lines += ["", f"Published for this task (the paper's recipe, `{paper[0]}`): {paper[1]}. Not comparable one "
                  "to one: different split, and the published data set is larger than the part in this project's data."]
    lines += ["", "| class | precision | recall | F1 | specificity | support |", "|---|---|---|---|---|---|"]
    for n in spec.labels:
        c = metrics["per_class"][n]
        lines.append(f"| {n} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['specificity']:.4f} "
                     f"| {c['support']} |")
    return lines + ["", "Plots: `plots/training_curves.png`, `plots/confusion_matrix.png`, `plots/roc.png`.", ""]


def _card_limitations(recipe, spec) -> List[str]:
    is_ct = recipe.modality == "CT"
    lines = ["## Intended use",
             "- Research and engineering of on-device lung-image classification (conversion to TFLite, "
             "benchmarks). Not a medical device; not for diagnosis or triage of real patients."]
    intended = getattr(spec, "intended", None) or {}
    lines += [f"- Built for: {k.replace('_', ' ')} {v}" for k, v in intended.items()]
    lines += ["- Every converted file carries a domain gate that refuses images unlike these (another modality, "
              "a photo, a blank or failed exposure...): its refusal rates are in the section "
              "\"Domain gate\" that `lungedge convert` adds below.", "", "## Limitations"]
    if intended.get("population", "").startswith("children"):
        lines.append("- **Population shift:** the training images are of young children from one hospital; adults' "
                     "chest X-rays look different (body size, bone density, other disease). The domain gate is fitted to "
                     "these images and was not measured on adults' X-rays (none were available): do not count on it "
                     "to refuse them; expect lower accuracy on adults (NORMAL recall especially) and validate "
                     "before any such use.")
    synthetic = recipe.modality == "generated"
    if synthetic:
        lines.append("- Trained and tested on procedurally generated radiograph-like images (`lungedge demo`): the "
                     "numbers show that the pipeline works end to end, and say nothing about real radiographs.")
    else:
        lines.append("- Trained on one public dataset from one source; accuracy on images from other hospitals, "
                     "scanners, ages or preprocessing is unknown and usually lower.")
    if is_ct and not synthetic and recipe.split == "blocked":
        lines.append(
            f"- **Leakage caveat (CT):** IQ-OTH/NCCD has no patient ids; this split keeps blocks of "
            f"{recipe.split_block} consecutive slice numbers per class apart (neighbouring numbers are neighbouring "
            "slices of one patient), a stand-in for a patient-disjoint split: a patient whose slices straddle a block "
            "edge is still on both sides, so the test accuracy is still somewhat optimistic for new patients.")
    elif is_ct and not synthetic:
        lines.append(
            "- **Leakage caveat (CT):** IQ-OTH/NCCD holds slices of about 110 patients with no patient id in the "
            "file names, so this random split puts slices of one patient on both sides of train/test. The test "
            "accuracy above (and the published 97-99 % figures, which share the flaw) overstates accuracy on "
            "new patients: on such folds a nearest-neighbour lookup of the neighbouring slice, with no training, "
            "scores as well (train/SELECTION.md). `--split blocked` keeps neighbouring slices apart for an estimate "
            "closer to new patients.")
    elif recipe.split == "random" and not synthetic:
        lines.append(
            "- **Leakage caveat:** the split is random per image, and Kermany file names show several images per "
            "patient, so one patient can be in train and test; this inflates test accuracy. Use the grouped split "
            "(`--split grouped`) for a patient-disjoint estimate.")
    elif not synthetic:
        lines.append("- The split is patient-grouped (no patient in two splits), from the patient ids in the file names.")
    if not is_ct and not synthetic:
        lines.append(
            "- Validation scores on this data are an optimistic guide: earlier measurements on the patient-disjoint "
            "official Kermany test split gave 0.75-0.90 accuracy for this kind of model (it over-calls pneumonia). "
            "Judge it on an external set (`python experiments/external_dev.py`) and recalibrate for a site "
            "(`lungedge recalibrate`); the external X-ray dev set in ../shared is one hospital's images.")
    if spec.threshold:
        lines.append("- The threshold trades specificity for recall of the disease class; it was chosen on the "
                     "validation split, whose distribution may differ from deployment data.")
    return lines
