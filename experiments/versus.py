"""python -m piece_mm.experiments.versus A/summary.json B/summary.json --method piece-f --labels exact,cached
    [--output table.md]

One method's results in two comparisons (compare's summary.json) side by side, seed by seed: OP, BWT, caption
retention (scored prompt and unseen prompts) and general-VQA retention, each seed's difference B − A, and the
largest difference of the means over the seeds both ran. For a change that should not move results (a faster way
to compute the same term), it says by how much it did. Exit 2 on bad input."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from piece_mm.errors import InputError

KEYS = ("OP", "BWT", "caption_retention", "caption_retention_unseen", "vqa_retention")


def _load(path: str, method: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: not a comparison's summary.json ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or method not in (data.get("methods") or {}):
        raise InputError(f"{p}: no method {method!r} (it has {', '.join((data or {}).get('methods') or {})})")
    return data


def table(a: dict, b: dict, method: str, labels: tuple[str, str]) -> tuple[str, float]:
    """(markdown, the largest |mean B − mean A| over KEYS) over the seeds both comparisons ran."""
    seeds = [s for s in a["seeds"] if s in b["seeds"]]
    if not seeds:
        raise InputError(f"no seed in both comparisons ({a['seeds']} and {b['seeds']})")
    ra, rb = a["methods"][method], b["methods"][method]
    lines = [f"| seed | metric | {labels[0]} | {labels[1]} | {labels[1]} − {labels[0]} |", "|---|---|---:|---:|---:|"]
    worst = 0.0
    for key in KEYS:
        if ra.get(key) is None or rb.get(key) is None:
            continue
        xs = [ra[key][a["seeds"].index(s)] for s in seeds]
        ys = [rb[key][b["seeds"].index(s)] for s in seeds]
        for s, x, y in zip(seeds, xs, ys):
            lines.append(f"| {s} | {key} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
        mx, my = statistics.mean(xs), statistics.mean(ys)
        worst = max(worst, abs(my - mx))
        lines.append(f"| mean | **{key}** | {mx:.3f} | {my:.3f} | **{my - mx:+.3f}** |")
    return "\n".join(lines) + "\n", worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.versus", description=__doc__.split("\n\n")[1])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--method", default="piece-f")
    ap.add_argument("--labels", default="A,B", help="two names, comma-separated")
    ap.add_argument("--output", default=None, help="write the table there too")
    args = ap.parse_args(argv)
    try:
        labels = tuple(args.labels.split(","))
        if len(labels) != 2:
            raise InputError(f"--labels {args.labels!r}: expected two names, comma-separated")
        text, worst = table(_load(args.a, args.method), _load(args.b, args.method), args.method, labels)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = (f"{args.method}: {args.a} ({labels[0]}) against {args.b} ({labels[1]}); the largest difference of the "
            f"means: {worst:.3f}\n\n" + text)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
