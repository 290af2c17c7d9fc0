"""python -m piece_mm.experiments.frontier --summaries a/summary.json,b/summary.json --output results/methods-llava

Every method of earlier comparisons side by side: the summary.json files that piece_mm.experiments.compare wrote,
read back (nothing is rerun), in one figure and one table.
- <output>.png: caption retention against OP, one point per method (mean ± std over its seeds);
- <output>.md: one row per method (lr, seeds, OP, BWT, caption retention, the summary it came from) and which other
  methods dominate it: at least as good in both OP and retention, and better in one (means over the seeds both
  ran, or over each one's own when they share none).

A method found in more than one summary is taken from the one with the most seeds (the first listed on a tie). The
arms a study left out because a run of theirs is still to make (its summary's "unfinished") are named under the
table and in the figure's title.
Exit 0 on success, 2 on bad input (a missing or malformed summary)."""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from piece_mm.errors import InputError

from .labels import place_labels

KEYS = ("OP", "BWT", "caption_retention")


def read(paths: list[Path]) -> dict[str, dict]:
    """{method: {"lr", "seeds", "OP", "BWT", "caption_retention" (per-seed lists), "source"}} over the summaries."""
    out: dict[str, dict] = {}
    for path in paths:
        try:
            s = json.loads(path.read_text())
            seeds, methods = list(s["seeds"]), dict(s["methods"])
            # runs that failed are not in the lists; one failed at an lr the sweep did not choose is not in them either
            failed = {(f["method"], f["seed"], f["lr"]) for f in s.get("failed", [])}
        except FileNotFoundError:
            raise InputError(f"--summaries {path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"--summaries {path}: not a summary.json of piece_mm.experiments.compare "
                             f"({type(e).__name__}: {e})") from None
        for m, row in methods.items():
            lr = row.get("lr") if isinstance(row, dict) else None
            own = row.get("seeds") if isinstance(row, dict) else None  # a study's arm may run fewer than the study
            ran = own if isinstance(own, list) else [x for x in seeds if (m, x, lr) not in failed]  # what it is for
            for k in KEYS:
                xs = row.get(k) if isinstance(row, dict) else None
                if not isinstance(xs, list) or len(xs) != len(ran) or not xs or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
                    raise InputError(f"--summaries {path}: field 'methods.{m}.{k}' is {xs!r}; expected one number "
                                     f"per seed that ran ({len(ran)})")
            if m not in out or len(ran) > len(out[m]["seeds"]):
                out[m] = {"lr": lr, "seeds": ran, **{k: list(row[k]) for k in KEYS},
                          "source": str(path)}
    return out


def unfinished(paths: list[Path], rows: dict[str, dict]) -> list[str]:
    """The arms the summaries name as still to finish (study --finished), and that none of them has a row for."""
    names: list[str] = []
    for path in paths:
        for m in json.loads(path.read_text()).get("unfinished") or []:
            if m not in rows and m not in names:
                names.append(m)
    return names


def _means(r: dict, seeds) -> tuple[float, float]:
    at = [i for i, x in enumerate(r["seeds"]) if x in seeds]
    return (statistics.mean(r["OP"][i] for i in at), statistics.mean(r["caption_retention"][i] for i in at))


def dominators(rows: dict[str, dict]) -> dict[str, list[str]]:
    """{method: the methods whose OP and retention are both >= its own, one of them strictly}, compared over the
    seeds both ran (a seed is the same data and start for every method), or over each one's own seeds when they
    share none: a one-seed row is set against the other's run of that seed, not against its mean over three."""
    def beats(o, m):
        common = [x for x in rows[m]["seeds"] if x in rows[o]["seeds"]]
        a, b = (_means(rows[o], common), _means(rows[m], common)) if common else \
            (_means(rows[o], rows[o]["seeds"]), _means(rows[m], rows[m]["seeds"]))
        return a[0] >= b[0] and a[1] >= b[1] and a != b
    return {m: [o for o in rows if o != m and beats(o, m)] for m in rows}


def _cell(xs: list[float], sign: bool = False) -> str:
    mean = f"{statistics.mean(xs):{'+' if sign else ''}.3f}"
    return mean if len(xs) == 1 else f"{mean} ± {statistics.pstdev(xs):.3f}"


ZOOM_FROM = 0.9  # the zoom panel shows the methods at or above this caption retention


def write(rows: dict[str, dict], output: Path, title: str, command: str, missing: list[str] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dom = dominators(rows)
    order = sorted(rows, key=lambda m: -statistics.mean(rows[m]["OP"]))
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             "Each method's lr and seeds are those of the comparison it comes from (OP, BWT and caption retention: "
             "mean ± std over seeds). A method is dominated by another with OP and retention both at least as high, "
             "one of them higher, compared over the seeds both ran (a seed is the same data and start for every "
             "method; over each one's own seeds when they share none).", "",
             "| method | lr | seeds | OP | BWT | caption retention | dominated by | from |",
             "|---|---|---|---|---|---|---|---|"]
    for m in order:
        r = rows[m]
        lr = f"{r['lr']:g}" if isinstance(r["lr"], (int, float)) else "?"
        lines.append(f"| {m} | {lr} | {', '.join(map(str, r['seeds']))} | " +
                     " | ".join(_cell(r[k], sign=k == "BWT") for k in KEYS) +
                     f" | {', '.join(dom[m]) or '—'} | {r['source']} |")
    if missing:
        lines += ["", f"Not in this table, a run of each still to make: {', '.join(missing)}."]
    lines += ["", f"![caption retention against OP]({output.name}.png)", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.md").write_text("\n".join(lines))
    pts = {m: (statistics.mean(rows[m]["OP"]), statistics.mean(rows[m]["caption_retention"])) for m in order}
    top = [m for m in order if pts[m][1] >= ZOOM_FROM]  # the band a user reads first: retention kept
    zoom = len(top) >= 2
    if zoom:  # its frame, and every method inside it (one a little under the line too: the frame shows it)
        xs, ys = [pts[m][0] for m in top], [pts[m][1] for m in top]
        dx, dy = max(max(xs) - min(xs), 0.02), max(max(ys) - min(ys), 0.005)
        box = (min(xs) - 0.15 * dx, max(xs) + 0.25 * dx, min(ys) - 0.2 * dy, max(ys) + 0.2 * dy)
        top = [m for m in order if box[0] <= pts[m][0] <= box[1] and box[2] <= pts[m][1] <= box[3]]
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(14, 5.2) if zoom else (8.5, 5), squeeze=False)
    ax = axes[0][0]
    for i, m in enumerate(order):
        r = rows[m]
        front = not dom[m]
        for a in axes[0] if m in top else axes[0][:1]:
            a.errorbar(*pts[m], xerr=statistics.pstdev(r["OP"]), yerr=statistics.pstdev(r["caption_retention"]),
                       fmt="osD^v<>ph*XP"[i % 12], color=plt.cm.tab10(i % 10), capsize=3,
                       markersize=9 if front else 8, mfc=None if front else "none", mew=1.2,
                       label=f"{m} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})"
                             + ("" if front else ", dominated") if a is ax else None)
    ax.set_xlim(0, 1.15)  # both are shares: a fixed frame, with room for the labels right of OP 1
    ax.set_ylim(0, max(1.1, max(p[1] for p in pts.values()) + 0.1))
    ax.set_title(f"{title}\nfilled: dominated by no other method; hollow: dominated (over the seeds both ran)"
                 + (f"\nnot shown, a run still to make: {', '.join(missing)}" if missing else ""), fontsize=9)
    panels = [(ax, [m for m in order if m not in top] if zoom else order)]  # the zoom names its own
    if zoom:
        z = axes[0][1]
        z.set_xlim(box[0], box[1])
        z.set_ylim(box[2], box[3])
        z.set_title(f"zoom on the dashed box: the methods that keep caption retention >= {ZOOM_FROM:.2f} "
                    "(same markers)", fontsize=9)
        ax.add_patch(plt.Rectangle((box[0], box[2]), box[1] - box[0], box[3] - box[2], fill=False, ls="--", lw=0.8,
                                   color="grey"))
        panels.append((z, top))
    for a, ms in panels:
        a.set_xlabel("OP (mean over seeds)")
        a.set_ylabel("caption retention (mean over seeds)")
        a.axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[0][-1].legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),
                       borderaxespad=0)  # outside the last panel: no point hidden
    fig.tight_layout()
    for a, ms in panels:  # after the layout: labels are placed in display space, away from each other and the markers
        place_labels(fig, a, [(m, pts[m], plt.cm.tab10(order.index(m) % 10)) for m in ms],
                     [pts[m] for m in order if m not in ms and (a is ax or m in top)])
    fig.savefig(f"{output}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.frontier", description=__doc__.splitlines()[0])
    ap.add_argument("--summaries", required=True, help="comma-separated summary.json files of earlier comparisons")
    ap.add_argument("--output", type=Path, required=True, help="writes <output>.png and <output>.md")
    ap.add_argument("--title", default="every method, side by side")
    args = ap.parse_args(argv)
    try:
        paths = [Path(p) for p in args.summaries.split(",") if p.strip()]
        if not paths:
            raise InputError(f"--summaries {args.summaries!r}: expected one or more summary.json files")
        rows = read(paths)
        if not rows:
            raise InputError(f"--summaries {args.summaries!r}: no method in any of them")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(rows, args.output, args.title,
          "python -m piece_mm.experiments.frontier " + shlex.join(argv if argv is not None else sys.argv[1:]),
          unfinished(paths, rows))
    print(f"wrote {args.output}.png, {args.output}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
