"""python -m piece_mm.experiments.sheet --tasks world-shared --output results/shared-interim/tasks.png [--per-task 4]

What a sequence's tasks look like: the first test examples of each task, one row per task, each picture titled with
its prompt and answer. Exit 0, or 2 on bad input (the sequence's own errors)."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from piece_mm.errors import InputError, from_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.sheet", description=__doc__.splitlines()[2])
    ap.add_argument("--tasks", default="world-shared", help="sequence YAML, or a name in configs/sequences")
    ap.add_argument("--output", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--per-task", type=int, default=4)
    args = ap.parse_args(argv)
    try:
        if args.per_task < 1:
            raise InputError(f"--per-task: {args.per_task}; expected a positive integer")
        from piece_mm.tasks.base import load_image
        from piece_mm.tasks.sequence import load_sequence
        with from_data():
            seq = load_sequence(args.tasks)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(seq.tasks), args.per_task
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows), squeeze=False)
    for r, task in enumerate(seq.tasks):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(task.test):
                continue
            ex = task.test[c]
            ax.imshow(load_image(ex), interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(ex.prompt, 24)) + f"\n→ {ex.answer}", fontsize=7)
        axes[r][0].text(-0.15, 0.5, task.name, transform=axes[r][0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=10, weight="bold")
    fig.suptitle(f"{seq.path.stem}: {args.per_task} test examples per task (prompt → answer)", fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
