"""report.md and PNG plots from a run's metrics.json contents (eval reads the record; it never trains)."""
from __future__ import annotations

from pathlib import Path

CAPTION_KEYS = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore", "VQA",
                "answer_leak", "bare_answer")


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


def _layer_keys(selection: list[dict], comps: list[str]) -> list[str]:
    keys = {k for sel in selection for c in comps for k in sel[c]["layers"]}
    return sorted(keys, key=lambda k: (k == "other", k.zfill(6)))


def plot_selection(metrics: dict, path: Path) -> None:
    """Where each task's chosen weights sit: one heatmap per task, layer (rows) × component (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selection = metrics["selection"]
    comps = [c for c in ("vision", "projector", "llm") if c in selection[0]]
    layers = _layer_keys(selection, comps)
    fig, axes = plt.subplots(1, len(selection), figsize=(2.6 * len(selection) + 1, 0.35 * len(layers) + 2),
                             squeeze=False)
    for ax, sel in zip(axes[0], selection):
        grid = [[sel[c]["layers"].get(k, 0) for c in comps] for k in layers]  # [layer, component]
        im = ax.imshow(grid, cmap="magma", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="c")
        ax.set_xticks(range(len(comps)), comps, rotation=30)
        ax.set_yticks(range(len(layers)), [f"layer {k}" if k != "other" else k for k in layers])
        ax.set_title(sel["task"])
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"{metrics['model']} / {metrics['method']}: chosen weights per layer and component")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _selection_lines(metrics: dict) -> list[str]:
    selection, tasks = metrics["selection"], metrics["tasks"]
    comps = [c for c in ("vision", "projector", "llm") if c in selection[0]]
    layers = _layer_keys(selection, comps)
    lines = ["## Chosen weights", "", f"Budget: `{metrics.get('budget', '')}`. Count of tuned weights per component "
             "and per layer (\"other\": embeddings, final norms, heads, projector).", "",
             "| task | " + " | ".join(comps) + " | total |", "|---" * (len(comps) + 2) + "|"]
    for sel in selection:
        lines.append(f"| {sel['task']} | " + " | ".join(f"{sel[c]['chosen']:,}" for c in comps) +
                     f" | {sel['total']:,} |")
    cols = [(c, k) for c in comps for k in layers if any(sel[c]["layers"].get(k) for sel in selection)]
    lines += ["", "| task | " + " | ".join(f"{c} {k}" for c, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for sel in selection:
        lines.append(f"| {sel['task']} | " + " | ".join(str(sel[c]["layers"].get(k, 0)) for c, k in cols) + " |")
    lines += ["", "![chosen weights](selection.png)", ""]
    J = metrics.get("mask_jaccard")
    if J:
        lines += ["### Mask overlap between tasks (Jaccard)", "", "| | " + " | ".join(tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|"]
        for t, row in zip(tasks, J):
            lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    return lines


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
             "## Score matrix", "", "Row = stage, column = task evaluated, by its metric (" +
             ", ".join(f"{t}: {m}" for t, m in zip(tasks, metrics.get("task_metrics", ["exact"] * len(tasks)))) +
             "; exact = normalised exact match, vqa = VQA accuracy, contains = answer words in the reply).", "",
             "| stage | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for stage, row in zip(_stages(tasks), R):
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    keys = [k for k in CAPTION_KEYS if k in g["before"]]
    lines += ["", "![score matrix](score_matrix.png)", "", "## General ability (held-out captions, general VQA)", "",
              "| stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for stage, m in zip(_stages(tasks), [g["before"]] + g["after"]):
        lines.append(f"| {stage} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    lines += ["", "![CIDEr across stages](cider.png)", ""]
    if metrics.get("selection"):
        plot_selection(metrics, out_dir / "selection.png")
        lines += _selection_lines(metrics)
    if metrics.get("trace_cosine"):
        C = metrics["trace_cosine"]
        lines += ["## TRACE: how alike the tasks' updates are", "",
                  "Mean over tensors of cos(ΔW_i, ΔW_j), from each task's probe (count sketches). A tensor's "
                  "specificity for a task is its mean cosine to the earlier tasks; the lower, the more task-specific.",
                  "", "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for t, row in zip(tasks, C)] + [""]
    if samples:
        lines += ["## Sample captions", "", "| stage | caption | reference |", "|---|---|---|"]
        for stage, pairs in zip(_stages(tasks), samples):
            for pred, ref in pairs:
                lines.append(f"| {stage} | {pred or '(empty)'} | {ref} |")
        lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))


def write_sweep(out_dir: Path, model: str, rows: list[dict], meta: dict) -> None:
    """sweep.json, table.md and frontier.png (caption retention against own-task accuracy, SeqFT on the same axes)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "sweep.json").write_text(json.dumps({"model": model, **meta, "settings": rows}, indent=1))
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["own_task"] for r in pts], [r["caption_retention"] for r in pts], label=method,
                   marker="x" if method == "seqft" else "o")
        for r in pts:
            label = f"lr {r['lr']:g}, {r['steps']} st" + (f", llm {r['fractions']['llm']:g}" if r["fractions"] else "")
            ax.annotate(label, (r["own_task"], r["caption_retention"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    ax.axvline(0.8, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("own-task accuracy (mean R[i][i])")
    ax.set_ylabel("caption retention (CIDEr after last task / before)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, max(1.1, max(r["caption_retention"] for r in rows) + 0.05))
    ax.set_title(f"{model}: retention vs new-task accuracy, one point per setting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=110)
    plt.close(fig)
    lines = [f"# Sweep on {model}", "", f"Command: `{meta['command']}` (grid `{meta['grid']}`)", "",
             "| setting | own-task mean | own-task min | caption retention | VQA retention | OP | BWT | tuned weights |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], -r["caption_retention"])):
        lines.append(f"| {r['tag']} | {r['own_task']:.3f} | {r['min_own_task']:.3f} | {r['caption_retention']:.3f} | "
                     f"{r['VQA_retention']:.3f} | {r['OP']:.3f} | {r['BWT']:+.3f} | {r['trainable']:,} |")
    lines += ["", "![frontier](frontier.png)", ""]
    (out_dir / "table.md").write_text("\n".join(lines))
