"""report.md and PNG plots from a run's metrics.json contents."""
from __future__ import annotations

from pathlib import Path

CAPTION_KEYS = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "CLIPScore", "VQA")


def _stages(tasks: list[str]) -> list[str]:
    return ["before"] + [f"after {t}" for t in tasks]


def plot_score_matrix(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, tasks = metrics["scores"], metrics["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 0.6 * len(R) + 1.5))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(R)), _stages(tasks))
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{metrics['model']} / {metrics['method']}: task scores")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_caption_curve(metrics: dict, path: Path, key: str = "CIDEr") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = metrics["general"]
    ys = [g["before"][key]] + [a[key] for a in g["after"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(ys)), ys, marker="o")
    ax.set_xticks(range(len(ys)), _stages(metrics["tasks"]), rotation=20)
    ax.set_ylabel(key)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{metrics['model']} / {metrics['method']}: held-out {key} across stages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, metrics: dict, samples: list[list[tuple[str, str]]] | None = None) -> None:
    """report.md (score matrix, summary, caption metrics per stage, sample captions) and the two plots."""
    out_dir = Path(out_dir)
    plot_score_matrix(metrics, out_dir / "score_matrix.png")
    plot_caption_curve(metrics, out_dir / "cider.png")
    tasks, R, g, s = metrics["tasks"], metrics["scores"], metrics["general"], metrics["summary"]
    lines = [f"# {metrics['model']} / {metrics['method']} (seed {metrics['seed']})", "",
             f"Tasks in order: {' → '.join(tasks)}. Run time {metrics['time_s']:.0f} s.", "",
             "## Summary", "", "| OP | BWT | FWT | caption retention (CIDEr) |", "|---|---|---|---|",
             f"| {s['OP']:.3f} | {s['BWT']:+.3f} | {s['FWT']:+.3f} | {s['caption_retention']:.3f} |", "",
             "Trainable weights: " + ", ".join(f"{k} {v:,}" for k, v in metrics["trainable"].items()), "",
             "## Score matrix", "", "Row = stage, column = task evaluated (normalised exact match).", "",
             "| stage | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for stage, row in zip(_stages(tasks), R):
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    keys = [k for k in CAPTION_KEYS if k in g["before"]]
    lines += ["", "![score matrix](score_matrix.png)", "", "## General ability (held-out captions, general VQA)", "",
              "| stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for stage, m in zip(_stages(tasks), [g["before"]] + g["after"]):
        lines.append(f"| {stage} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    lines += ["", "![CIDEr across stages](cider.png)", ""]
    if samples:
        lines += ["## Sample captions", "", "| stage | caption | reference |", "|---|---|---|"]
        for stage, pairs in zip(_stages(tasks), samples):
            for pred, ref in pairs:
                lines.append(f"| {stage} | {pred or '(empty)'} | {ref} |")
        lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))
