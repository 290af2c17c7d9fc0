"""report.md and PNG plots from a run's metrics.json contents (eval reads the record; it never trains)."""
from __future__ import annotations

from pathlib import Path

RETENTION_THRESHOLD = 0.90  # caption retention at or above which a report says general ability was kept
LEARNED = 0.5  # own-task score right after learning at or above which a report counts a task as learned
RESULTS = Path(__file__).resolve().parent.parent / "results"
CAPTION_KEYS = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore", "VQA",
                "VQA_seen", "VQA_unseen", "answer_leak", "bare_answer")


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
    """Held-out CIDEr at each stage against the base model's line and the kept-threshold line, with the retention."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = metrics["general"]
    base = g["before"][key]
    # a stage whose general set was not scored (--eval-general last) has no point
    xs, ys = zip(*[(x, a[key]) for x, a in enumerate([g["before"]] + g["after"]) if key in a])
    xs, ys = list(xs), list(ys)
    thr = metrics.get("retention_threshold", RETENTION_THRESHOLD)
    ret = ys[-1] / base if base else float("nan")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(base, color="grey", lw=1, ls="-", label=f"base model: {base:.2f}")
    ax.axhline(thr * base, color="tab:red", lw=1, ls="--", label=f"kept threshold: {thr:.2f} x base")
    ax.plot(xs, ys, marker="o", color="tab:blue", label=f"{metrics['method']}")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.2f}", (x, y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.text(0.98, 0.96, f"caption retention {ret:.2f} ({'kept' if ret >= thr else 'lost'})", transform=ax.transAxes,
            ha="right", va="top", fontsize=10, fontweight="bold", color="tab:green" if ret >= thr else "tab:red")
    ax.set_xticks(range(len(g["after"]) + 1), _stages(metrics["tasks"]), rotation=20)
    ax.set_ylabel(f"held-out {key}")
    ax.set_ylim(0, max(ys + [base]) * 1.25 or 1)
    ax.set_title(f"{metrics['model']} / {metrics['method']}: captioning across the sequence")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layer_keys(selection: list[dict], comps: list[str]) -> list[str]:
    keys = {k for sel in selection for c in comps for k in sel[c]["layers"]}
    return sorted(keys, key=lambda k: (k == "other", k.zfill(6)))


def plot_selection(metrics: dict, path: Path) -> None:
    """Where each task's chosen weights sit: left, the count per component and task (bars); right, one heatmap per
    task of layer (rows) x component (columns), all on one colour scale, with the counts written in."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    selection = metrics["selection"]
    comps = [c for c in ("vision", "projector", "llm") if c in selection[0]]
    comps = [c for c in comps if any(sel[c]["chosen"] for sel in selection)] or comps
    layers = _layer_keys(selection, comps)
    grids = [[[sel[c]["layers"].get(k, 0) for c in comps] for k in layers] for sel in selection]
    top = max([v for g in grids for row in g for v in row] + [1])
    n = len(selection)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.2 * n + 4, 0.32 * len(layers) + 2.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * n})
    bar_ax = axes[0][0]
    left = [0] * n
    colours = {"vision": "tab:purple", "projector": "tab:orange", "llm": "tab:blue"}
    for c in comps:
        colour = colours[c]
        vals = [sel[c]["chosen"] for sel in selection]
        bar_ax.barh(range(n), vals, left=left, color=colour, label=c)
        left = [a + b for a, b in zip(left, vals)]
    for i, total in enumerate(left):
        bar_ax.text(total, i, f" {total:,}", va="center", fontsize=8)
    bar_ax.set_yticks(range(n), [sel["task"] for sel in selection])
    bar_ax.invert_yaxis()
    bar_ax.set_xlim(0, max(left + [1]) * 1.35)
    bar_ax.set_title("chosen weights per component", fontsize=9)
    bar_ax.legend(fontsize=7, loc="lower right")
    norm = LogNorm(vmin=1, vmax=top)
    im = None
    for n_ax, (ax, sel, grid) in enumerate(zip(axes[0][1:], selection, grids)):
        masked = [[v if v else float("nan") for v in row] for row in grid]
        im = ax.imshow(masked, cmap="viridis", norm=norm, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=7,
                            color="white" if v < top ** 0.5 else "black")
        ax.set_xticks(range(len(comps)), comps, fontsize=8)
        ax.set_yticks(range(len(layers)), [f"layer {k}" if k != "other" else k for k in layers] if n_ax == 0 else
                      [], fontsize=7)
        ax.set_title(sel["task"], fontsize=9)
    fig.colorbar(im, ax=list(axes[0][1:]), fraction=0.03, label="chosen weights (one scale for every task)")
    fig.suptitle(f"{metrics['model']} / {metrics['method']}: where each task's chosen weights are")
    fig.savefig(path, dpi=110, bbox_inches="tight")
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


def seqft_reference(model: str, tasks: list[str], results: Path = RESULTS) -> tuple[Path, dict] | None:
    """The SeqFT row of a comparison in results/ on the same model and task order, if there is one: (file, row with
    per-seed lists). A summary.json names its model and tasks; one from before it did counts by its directory name
    (world-<model>) only for the default sequence's tasks."""
    import json
    default = ["size", "color", "location", "count"]  # configs/sequences/world.yaml
    for path in sorted(results.glob("*/summary.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        row = s.get("methods", {}).get("seqft")
        if not row:
            continue
        if "model" in s:
            same = s["model"] == model and s.get("tasks") == tasks
        else:
            same = path.parent.name == f"world-{model}" and tasks == default
        if same:
            return path, row
    return None


def verdict(metrics: dict, reference: tuple[Path, dict] | None = None) -> list[str]:
    """The report's opening lines: general ability kept or lost against the stated threshold, the tasks learned,
    the forgetting, and SeqFT's figure on the same model and tasks when results/ has one."""
    import statistics
    tasks, R, s, g = metrics["tasks"], metrics["scores"], metrics["summary"], metrics["general"]
    thr = metrics.get("retention_threshold", RETENTION_THRESHOLD)
    ret = s["caption_retention"]
    before, after = g["before"].get("CIDEr"), g["after"][-1].get("CIDEr")
    unseen = s.get("caption_retention_unseen")
    kept = "KEPT" if ret >= thr and (unseen is None or unseen >= thr) else "LOST"
    if ret >= thr and kept == "LOST":  # kept under the scored prompt only
        kept = "LOST where it is not scored"
    own = [R[i + 1][i] for i in range(len(tasks))]
    learned = [t for t, v in zip(tasks, own) if v >= LEARNED]
    lines = []
    by = s.get("caption_retention_by_metric")
    if by:  # a recipe's own metrics first (the PIECE paper's: BLEU-1, BLEU-4, ROUGE-L), CIDEr's beside them
        names = {"BLEU_1": "BLEU-1", "BLEU_2": "BLEU-2", "BLEU_3": "BLEU-3", "BLEU_4": "BLEU-4", "ROUGE_L": "ROUGE-L"}
        lines.append("- **Caption retention by the sequence's lead metrics** (after the last task / before): " +
                     ", ".join(f"{names.get(k, k)} {v:.3f}" for k, v in by.items()) + ".")
    lines += [f"- **General ability {kept}:** caption retention {ret:.3f} (held-out CIDEr {after:.2f} after the last "
             f"task / {before:.2f} before; kept means ≥ {thr:.2f}, here and under the prompts no method was given "
             "where they were asked).",
             f"- **Tasks learned: {len(learned)} of {len(tasks)}** (score right after learning each, ≥ {LEARNED:g} "
             "counts as learned): " + ", ".join(f"{t} {v:.2f}" for t, v in zip(tasks, own)) + ".",
             f"- **Forgetting:** BWT {s['BWT']:+.3f} (mean change of each earlier task's score from right after it was "
             f"learned to the end); OP {s['OP']:.3f} (mean task score at the end)."]
    if "caption_retention_unseen" in s:
        prompts = list(g["before"].get("unseen_prompts") or {})
        lines.append(f"- **Under prompts no method was given:** caption retention {unseen:.3f}"
                     " (the mean over " + ", ".join(f'"{p}"' for p in prompts) + "; the general set's own prompt "
                     "above is one a method may see).")
    vqa_b, vqa_a = g["before"].get("VQA"), g["after"][-1].get("VQA")
    if vqa_b:
        line = f"- **General VQA:** {vqa_a:.3f} at the end against {vqa_b:.3f} before (retention {vqa_a / vqa_b:.3f}"
        if "vqa_retention_unseen" in s:
            line += (f"; {s['vqa_retention_unseen']:.3f} over the questions asked in phrasings no method was given, "
                     f"{g['after'][-1]['VQA_unseen']:.3f} against {g['before']['VQA_unseen']:.3f}")
        lines.append(line + ").")
    if reference is not None and metrics["method"] != "seqft":
        path, row = reference
        try:
            where = path.relative_to(RESULTS.parent)
        except ValueError:
            where = path
        n = len(row["caption_retention"])
        lines.append(f"- **Against plain sequential fine-tuning** (SeqFT, {where}, {n} seed{'s' * (n > 1)}): caption "
                     f"retention {statistics.mean(row['caption_retention']):.3f}, OP "
                     f"{statistics.mean(row['OP']):.3f}, BWT {statistics.mean(row['BWT']):+.3f}.")
    return lines


def _summary_table(s: dict) -> list[str]:
    """OP, BWT, FWT and caption retention: by CIDEr, or by each of the sequence's lead metrics and CIDEr."""
    by = s.get("caption_retention_by_metric") or {"CIDEr": s["caption_retention"]}
    heads = [f"caption retention ({k.replace('_', '-')})" for k in by]
    return ["| OP | BWT | FWT | " + " | ".join(heads) + " |", "|---" * (3 + len(by)) + "|",
            f"| {s['OP']:.3f} | {s['BWT']:+.3f} | {s['FWT']:+.3f} | " + " | ".join(f"{v:.3f}" for v in by.values())
            + " |", ""]


def write_report(out_dir: Path, metrics: dict, samples: list[list[tuple[str, str]]] | None = None) -> None:
    """report.md (score matrix, summary, caption metrics per stage, sample captions) and the two plots."""
    out_dir = Path(out_dir)
    plot_score_matrix(metrics, out_dir / "score_matrix.png")
    plot_caption_curve(metrics, out_dir / "cider.png")
    tasks, R, g, s = metrics["tasks"], metrics["scores"], metrics["general"], metrics["summary"]
    ref = seqft_reference(metrics["model"], tasks)
    lines = [f"# {metrics['model']} / {metrics['method']} (seed {metrics['seed']})", "",
             *verdict(metrics, ref), "",
             f"Tasks in order: {' → '.join(tasks)}. Run time {metrics['time_s']:.0f} s (as printed at the end of the "
             "run).", "", "## Summary", "", *_summary_table(s),
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
    for stage, m in zip(_stages(tasks), [g["before"]] + g["after"]):  # "" where it was not scored (--eval-general)
        lines.append(f"| {stage} | " + " | ".join(f"{m[k]:.3f}" if k in m else "" for k in keys) + " |")
    lines += ["", "![CIDEr across stages](cider.png)", ""]
    prompts = list(g["before"].get("unseen_prompts") or {})
    if prompts:
        lines += ["### Captions under prompts no method was given", "",
                  "CIDEr of the same held-out images asked under each prompt (answer leak after the last task in "
                  "brackets). No method is given these prompts in training, scoring or regularisation.", "",
                  "| stage | " + " | ".join(f'"{p}"' for p in prompts) + " |", "|---" * (len(prompts) + 1) + "|"]
        for stage, m in zip(_stages(tasks), [g["before"]] + g["after"]):
            u = m.get("unseen_prompts") or {}
            lines.append(f"| {stage} | " + " | ".join(f"{u[p]['CIDEr']:.3f} ({u[p]['answer_leak']:.2f})" if p in u
                                                      else "" for p in prompts) + " |")
        lines.append("")
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
    """sweep.json, table.md and frontier.png (caption retention against the worst task's accuracy, with the target
    region shaded; SeqFT on the same axes)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "sweep.json").write_text(json.dumps({"model": model, **meta, "settings": rows}, indent=1))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.fill_between([0.8, 1.02], 0.9, 1.1, color="tab:green", alpha=0.12,
                    label="target: retention ≥ 0.90, every task ≥ 0.80")
    placed = []  # points already labelled: a label near one of them goes one line lower, so none overlap
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["min_own_task"] for r in pts], [r["caption_retention"] for r in pts], label=method,
                   marker="x" if method == "seqft" else "o", s=36)
        for r in pts:
            label = f"{r['fractions']['llm'] * 100:g} %, lr {r['lr']:g}" if r["fractions"] else f"lr {r['lr']:g}"
            if r["steps"] != pts[0]["steps"]:
                label += f", {r['steps']} st"
            x, y = r["min_own_task"], r["caption_retention"]
            near = sum(abs(px - x) < 0.1 and abs(py - y) < 0.03 for px, py in placed)
            placed.append((x, y))
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3 - 9 * near), textcoords="offset points")
    ax.set_xlabel("own-task accuracy, the worst task (min R[i][i], right after learning it)")
    ax.set_ylabel("caption retention (CIDEr after the last task / before)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, max(1.1, max(r["caption_retention"] for r in rows) + 0.05))
    ax.set_title(f"{model}: what each setting keeps against what it learns (labels: LLM budget, lr)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=110)
    plt.close(fig)
    lines = [f"# Sweep on {model}", "", f"Command: `{meta['command']}` (grid `{meta['grid']}`)", "",
             "| setting | own-task mean | own-task min | caption retention | VQA retention | OP | BWT "
             "| tuned weights |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], -r["caption_retention"])):
        lines.append(f"| {r['tag']} | {r['own_task']:.3f} | {r['min_own_task']:.3f} | {r['caption_retention']:.3f} | "
                     f"{r['VQA_retention']:.3f} | {r['OP']:.3f} | {r['BWT']:+.3f} | {r['trainable']:,} |")
    if meta.get("failed"):
        lines += ["", "Settings that failed (left out; their logs are in their run directories):", ""]
        lines += [f"- {tag}: {why}" for tag, why in meta["failed"].items()]
    lines += ["", "![frontier](frontier.png)", ""]
    (out_dir / "table.md").write_text("\n".join(lines))
