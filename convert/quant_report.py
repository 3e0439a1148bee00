"""The quantisation report: JSON (everything), Markdown (the table) and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

from lungedge.edge_runtime.atomic_write import atomic_write_bytes, atomic_write_text


def report_paths(out_dir) -> dict:
    """Where ``write_report`` puts the JSON, Markdown and PNG files."""
    out = Path(out_dir)
    return {ext: str(out / f"quantization_report.{ext}") for ext in ("json", "md", "png")}


def write_report(report: dict, out_dir) -> dict:
    """Write quantization_report.{json,md,png} into ``out_dir``; return their paths."""
    paths = report_paths(out_dir)
    atomic_write_text(paths["json"], json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    atomic_write_bytes(paths["png"], chart_png(report))
    return paths


def _counts(counts) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items()) or "-"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(report: dict) -> str:
    """The report as a Markdown page with one table row per model."""
    labels = report["labels"]
    disease = report["gate"]["disease_class"]
    k = report["keras"]
    head = ["model", "size (bytes)", "x float32", "accuracy %", "Δ acc (pts)"]
    head += [f"recall {n} %" for n in labels] + ["macro F1", "top-1 agreement %", "max abs Δp", "convert s", "gate"]
    rows = [["Keras (source)", "-", "-", _pct(k["accuracy"]), "-"]
            + [_pct(k["per_class_recall"][n]) for n in labels] + [f"{k['macro_f1']:.4f}", "100", "0", "-", "-"]]
    for v in report["variants"]:
        ratio = "-" if v["size_ratio"] is None else f"{v['size_ratio']:.3f}"
        gate = v["gate"] + (f" ({'; '.join(v['gate_reasons'])})" if v["gate_reasons"] else "")
        gate = gate.replace("|", "\\|")
        rows.append([f"{v['variant']}", str(v["size_bytes"]), ratio, _pct(v["accuracy"]),
                     f"{0.0 - v['accuracy_drop_pts']:+.2f}"]
                    + [_pct(v["per_class_recall"][n]) for n in labels]
                    + [f"{v['macro_f1']:.4f}", _pct(v["top1_agreement"]), f"{v['max_prob_diff']:.4f}",
                       f"{v['conversion_seconds']:.1f}", gate])
    t = report["test"]
    verdict = report.get("verdict") or {}
    lines = [
        f"# Quantisation report: {Path(str(report['source'])).name}",
        "",
        f"**Verdict: {verdict.get('message', 'passed' if report['passed'] else 'FAILED')}.**",
        "",
        f"Run folder `{report['source']}`. Test images: {t['n']} ({t['note']}; per class {_counts(t['class_counts'])}"
        + (f"; {len(t['failures'])} unreadable, left out" if t["failures"] else "") + ").",
        f"Decision rule: {k['decision']} (each variant uses the threshold in its own metadata).",
        f"Calibration (integer variants): {report['calibration']['count']} images, "
        f"{report['calibration']['source']}, per class {_counts(report['calibration']['class_counts'])}; "
        f"layer-by-layer bias correction {'on' if report.get('bias_correction', True) else 'off'}.",
        f"Gate (convert/quant_gate.py): a variant fails when it did not learn (accuracy not above the majority-class "
        f"rate, one-sided binomial p < 0.01), its accuracy is more than {report['gate']['max_accuracy_drop']} "
        f"points below Keras, or its recall of {disease} more than {report['gate']['max_recall_drop']} points "
        "below, and that drop is more than chance on the images where the two disagree (McNemar's exact "
        f"one-sided test, p < {report['gate'].get('paired_alpha', 0.05)}); the conversion passes when every float "
        f"variant and at least one integer variant pass. With {t['n']} test images one image is "
        f"{100 / max(t['n'], 1):.2f} points.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Δ acc: accuracy of the variant minus that of the Keras model, in percentage points. "
              "Agreement and |Δp| compare each variant's probabilities with the Keras model's on the same "
              "preprocessed arrays.", "",
              f"Source model sha256 `{report['source_model_sha256']}`; versions: "
              + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "."]
    for v in report["variants"]:
        if v.get("threshold_note"):
            lines.append(f"- {v['variant']}: {v['threshold_note']}")
    lines += domain_section(report)
    return "\n".join(lines) + "\n"


def domain_section(report: dict) -> list:
    """The domain gate's section: what was fitted, and each file's threshold and refusal rates."""
    fit = report.get("domain_fit")
    if not fit:
        return ["", "## Domain gate", "", f"None: {report.get('domain_gate') or 'not fitted'}; these files answer "
                "every image, whatever it shows."]
    sets = []
    for v in report["variants"]:
        for k in ((v.get("domain") or {}).get("dev_sets") or {}):
            if k not in sets:
                sets.append(k)
    head = ["file", "threshold", "validation refused %", "test refused %", "accuracy on accepted %"] + \
        [f"{k} refused %" for k in sets]
    lines = ["", "## Domain gate", "",
             f"Score: {fit['method']} v{fit['version']}, {fit['pooling']} of `{fit['layer']}` ({fit['dimension']} "
             f"values), class means and a {fit['covariance']} covariance (shrinkage {fit['shrinkage']:.3f}) fitted on "
             f"{fit['fit_images']} training images; aspect ratios of the training images "
             f"{_range(fit.get('aspect_range'))}; structure floor {fit.get('structure_floor') or 'none (check off)'}; saturation limit {fit.get('saturation_limit')}. Each file's threshold: the split-conformal 99th percentile of its own "
             "scores on the validation split. Refused also before the model: blank, saturated, tiny or odd-shaped "
             "frames; DICOM headers of another modality, body part or view.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v in report["variants"]:
        d = v.get("domain") or {}
        if d.get("gate") != "on":
            continue
        acc = (d.get("accepted") or {}).get("accuracy")
        cells = [v["variant"], f"{d['threshold']:.4g}", _pct(d.get("validation_refused") or 0.0),
                 f"{_pct(d['test_refused'])} ({d['test_refused_n']})", _pct(acc) if acc is not None else "-"]
        dev = d.get("dev_sets") or {}
        cells += [f"{_pct(dev[k]['refused'])} (of {dev[k]['n']})" if k in dev and dev[k]["refused"] is not None
                  else "-" for k in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _range(r) -> str:
    return f"{r[0]:.2f}-{r[1]:.2f}" if r else "not recorded"


def chart_png(report: dict) -> bytes:
    """Two panels: file size as a ratio of float32, and test accuracy next to Keras."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["variant"] for v in report["variants"]]
    ratios = [v["size_ratio"] or 0.0 for v in report["variants"]]
    accs = [100 * v["accuracy"] for v in report["variants"]]
    colors = ["tab:green" if v["gate"] == "passed" else "tab:red" for v in report["variants"]]
    keras_acc = 100 * report["keras"]["accuracy"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(names, ratios, color="tab:blue")
    ax1.set_ylabel("size / float32 size")
    ax1.set_title("file size")
    for i, r in enumerate(ratios):
        ax1.text(i, r, f"{r:.2f}", ha="center", va="bottom")
    ax2.bar(names, accs, color=colors)
    ax2.axhline(keras_acc, color="k", linestyle="--", label=f"Keras {keras_acc:.1f} %")
    ax2.axhline(keras_acc - report["gate"]["max_accuracy_drop"], color="tab:red", linestyle=":",
                label="gate")
    disease = report["gate"]["disease_class"]
    if disease in report["labels"]:
        recalls = [100 * v["per_class_recall"][disease] for v in report["variants"]]
        ax2.plot(names, recalls, "D", color="tab:purple", label=f"{disease} recall")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("percent of test images")
    ax2.set_title(f"accuracy on {report['test']['n']} test images (red: gate failed)")
    for i, a in enumerate(accs):
        ax2.text(i, a / 2, f"{a:.1f}", ha="center", va="center", color="white")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Quantisation report: {report.get('recipe') or Path(str(report['source'])).name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
