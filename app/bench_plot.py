"""The PNG chart of a bench report (matplotlib, Agg backend). Imported only when a chart is drawn.

Raises ImportError when matplotlib is not installed; ``lungedge.bench_report.write_report`` then skips the PNG.
"""

from __future__ import annotations

from typing import List


def plot_rows(rows: List[dict], path: str, title: str = "") -> str:
    """Horizontal bars of p50 latency (invoke and end to end) per model x threads [x machine].

    Whiskers reach p90. Failed models are listed on the chart as FAILED.

    Args:
        rows: ``bench.report_rows`` output.
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    labels, inv, inv90, e2e, e2e90 = _latency_series(rows)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(rows))))
    y = list(range(len(rows)))
    h = 0.38
    ax.barh([v - h / 2 for v in y], inv, height=h, xerr=[[0] * len(inv), inv90], label="invoke p50 (to p90)",
            color="#4C72B0", capsize=2)
    ax.barh([v + h / 2 for v in y], e2e, height=h, xerr=[[0] * len(e2e), e2e90],
            label="end to end p50 (to p90)", color="#DD8452", capsize=2)
    for yy, a, a90, b, b90 in zip(y, inv, inv90, e2e, e2e90):
        if a:
            ax.text(a + a90, yy - h / 2, f"  {a:.2f}", va="center", fontsize=7)
        if b:
            ax.text(b + b90, yy + h / 2, f"  {b:.2f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def _latency_series(rows: List[dict]):
    """Per row: its label, invoke p50 and p90 - p50, end-to-end p50 and p90 - p50 (ms)."""
    machines = {r.get("machine") for r in rows}
    labels, inv, inv90, e2e, e2e90 = [], [], [], [], []
    for r in rows:
        name = f"{r.get('model')} | {r.get('backend') or '?'} | {r.get('threads') or '-'} thr"
        if len(machines) > 1:
            name = f"{r.get('machine')} | " + name
        if r.get("error"):
            name += " | FAILED"
        labels.append(name)
        i, e = r.get("invoke") or {}, r.get("end_to_end") or {}
        inv.append(i.get("p50_ms", 0.0))
        inv90.append(max(0.0, i.get("p90_ms", 0.0) - i.get("p50_ms", 0.0)))
        e2e.append(e.get("p50_ms", 0.0))
        e2e90.append(max(0.0, e.get("p90_ms", 0.0) - e.get("p50_ms", 0.0)))
    return labels, inv, inv90, e2e, e2e90


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Write ``fig`` as a PNG to ``path`` atomically and close it; returns ``path``."""
    import io

    from lungedge.edge_runtime.atomic_write import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_tradeoff(rows: List[dict], path: str, title: str = "", note: str = "") -> str:
    """Accuracy against p50 invoke latency, one marker per variant, its area by file size.

    Args:
        rows: ``bench_report.tradeoff_rows`` output.
        path: the PNG to write (atomically).
        note: a line under the chart (the CPU features).
    """
    import textwrap

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    biggest = max(r["size_mb"] for r in rows) or 1.0
    # names beside the markers, alternately above and below along the latency axis (neighbours
    # are often a few hundredths of a ms apart); the full line per variant is in the legend
    for k, r in enumerate(sorted(rows, key=lambda r: r["invoke_p50_ms"])):
        x, y = r["invoke_p50_ms"], 100 * r["accuracy"]
        agree = "" if r["agreement"] is None else f", agrees {100 * r['agreement']:.1f}%"
        name = r["variant"] or r["model"]
        ax.scatter([x], [y], s=60 + 1400 * r["size_mb"] / biggest, alpha=0.55, edgecolors="black",
                   label=f"{name}: {100 * r['accuracy']:.2f}%, {r['size_mb']:.2f} MB, {x:.2f} ms{agree}")
        ax.annotate(name, (x, y), fontsize=8, xytext=(10, 10 if k % 2 == 0 else -16), textcoords="offset points")
    legend = ax.legend(fontsize=7, loc="lower right", markerscale=0.35, title="variant: accuracy, size, invoke p50",
                       title_fontsize=7)
    legend.get_frame().set_alpha(0.9)
    ys = [100 * r["accuracy"] for r in rows]
    lo, hi = min(ys), max(ys)
    ax.set_ylim(max(0.0, lo - max(2.0, (hi - lo))), min(100.5, hi + max(1.5, 0.5 * (hi - lo))))
    xs = [r["invoke_p50_ms"] for r in rows]
    ax.set_xlim(0, max(xs) * 1.35)
    ax.set_xlabel(f"invoke p50 latency (ms, {rows[0]['threads']} thread(s)); lower is better")
    ax.set_ylabel(f"test accuracy (%, {rows[0]['n']} images)")
    if rows[0].get("majority_rate") is not None:  # the floor any accuracy is read against
        m = 100 * rows[0]["majority_rate"]
        ax.axhline(m, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"majority-class rate {m:.1f}%", (0, m), xytext=(4, 3), textcoords="offset points",
                    fontsize=7, color="grey")
        bottom, top = ax.get_ylim()
        ax.set_ylim(min(bottom, m - 2), top)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    if note:
        majority = ("" if rows[0].get("majority_rate") is None else
                    f" Majority-class rate {100 * rows[0]['majority_rate']:.2f}% (always the most frequent class).")
        fig.text(0.01, 0.01, textwrap.fill(note + " Marker area: file size." + majority, 130), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.08 if note else 0, 1, 1))
    return _save(plt, fig, path)
