"""python -m piece_mm.experiments.compare --model llava --methods all --seeds 0,1,2 --output results/world-llava
    [--max-steps N]

Runs every method on the same sequence, each run in a process of its own (experiments/runs.py: a run that fails is
reported and the others go on), and writes:
- summary.json: {"seeds": [...], "methods": {method: {"OP": [per seed], "BWT": [...], "FWT": [...],
  "caption_retention": [...], "answer_leak": [...], "bare_answer": [...], "trainable_fraction": f,
  "peak_memory_mb": f, "time_s": [...], "lr": chosen}}}; answer_leak / bare_answer are the shares of the last
  stage's captions that use a task's answer word / are nothing but a task answer (null for a run recorded before
  they were measured);
- table.md: method × mean ± std (and the runs that failed, if any);
- retention_vs_op.png (one point per method) and cider.png (CIDEr across stages, one line per method).

Learning rate: every method gets the same small sweep (--lrs) on the first seed, and the other seeds use the lr with
the best OP there (--lr-from <summary.json> takes each method's lr from an earlier comparison instead: no sweep,
every seed at it). --max-steps and --budget apply to every method alike. A run that already finished (metrics.json
present) is read back, not rerun; one that stopped part-way is resumed. Exit 0 when every run finished, 1 when some
failed (the others are in the table), 2 on bad input."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from piece_mm.errors import InputError
from piece_mm.methods import METHODS
from piece_mm.runconfig import RunConfig
from piece_mm.select import load_budget

from .labels import place_labels

# The methods of the comparison, in table order; "all" means these.
ALL = ("seqft", "seqlora", "olora", "ewc", "lwf", "replay", "migu", "ln", "multitask", "piece-f", "piece-s", "trace")
KEYS = ("OP", "BWT", "FWT", "caption_retention")
LEAK_KEYS = ("answer_leak", "bare_answer")  # of the captions after the last task
# measured where the general set has them (null for a run recorded before they were): caption retention averaged over
# the prompts no method is given, general-VQA retention (all questions, and those asked in unseen phrasings), and the
# worst task's score right after it was learned
MORE_KEYS = ("caption_retention_unseen", "vqa_retention", "vqa_retention_unseen")


def run_all(args, methods: list[str], seeds: list[int], sweep: dict, threads: int) -> tuple[dict, list]:
    """Each method at each lr of sweep[method] on the first seed, then at the best of them (by OP; ties: the first
    lr) on the other seeds. Returns ({method: {"lr": chosen, "metrics": [metrics.json per seed]}}, the failed
    Outcomes). A method whose runs all fail on the first seed is left out; a failed later seed leaves it with fewer
    seeds."""
    from .runs import Job, run_jobs

    def job(m: str, seed: int, lr: float) -> Job:
        config = {"model": args.model, "method": m, "seed": seed, "lr": lr, "tasks": args.tasks,
                  "output": args.output / "runs" / f"{m}-lr{lr:g}-seed{seed}", "max_steps": args.max_steps,
                  "eval_limit": args.eval_limit}
        if args.budget:
            config["budget"] = args.budget
        if args.data_root:
            config["data_root"] = args.data_root
        if args.grad_accum > 1 or args.gradient_checkpointing:  # memory only: the same numbers up to rounding
            config.update(grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
        return Job((m, seed, lr), config)

    def report(o) -> None:
        if o.error:
            print(f"failed: {o.key[0]} (seed {o.key[1]}, lr {o.key[2]:g}): {o.error}", file=sys.stderr, flush=True)

    first = run_jobs([job(m, seeds[0], lr) for m in methods for lr in sweep[m]], args.jobs, threads, report)
    failed = [o for o in first.values() if o.error]
    chosen = {}
    for m in methods:
        ok = [(lr, first[(m, seeds[0], lr)].metrics) for lr in sweep[m] if first[(m, seeds[0], lr)].metrics]
        if ok:  # the best OP; ties: the first lr
            chosen[m] = max(ok, key=lambda x: (x[1]["summary"]["OP"], -sweep[m].index(x[0])))
    rest = run_jobs([job(m, s, lr) for m, (lr, _) in chosen.items() for s in seeds[1:]], args.jobs, threads, report)
    failed += [o for o in rest.values() if o.error]
    runs = {}
    for m, (lr, metrics) in chosen.items():
        later = [rest[(m, s, lr)].metrics for s in seeds[1:] if rest[(m, s, lr)].metrics]
        runs[m] = {"lr": lr, "metrics": [metrics] + later}
        print(f"{m:<10} lr {lr:g}  OP " + _mean_std([x["summary"]["OP"] for x in runs[m]["metrics"]]) +
              "  retention " + _mean_std([x["summary"]["caption_retention"] for x in runs[m]["metrics"]]), flush=True)
    return runs, failed


def summarise(runs: dict[str, dict], seeds: list[int]) -> dict:
    """runs: {method: {"lr": chosen, "metrics": [metrics.json per seed]}} -> the summary.json object."""
    first = next(iter(runs.values()))["metrics"][0]
    out = {"model": first["model"], "tasks": first["tasks"], "seeds": seeds, "methods": {}}
    for method, r in runs.items():
        ms = r["metrics"]
        row = {k: [m["summary"][k] for m in ms] for k in KEYS}
        for k in LEAK_KEYS:
            row[k] = [m["general"]["after"][-1].get(k) for m in ms]
        for k in MORE_KEYS:
            row[k] = [m["summary"].get(k) for m in ms]
        row["min_own_task"] = [min(m["scores"][i + 1][i] for i in range(len(m["tasks"]))) for m in ms]
        row["trainable_fraction"] = ms[0]["trainable"]["total"] / ms[0]["parameters"]
        row["peak_memory_mb"] = max(m["peak_memory_mb"] for m in ms)
        row["time_s"] = [m["time_s"] for m in ms]
        row["lr"] = r["lr"]
        out["methods"][method] = row
    return out


def _mean_std(xs) -> str:
    if any(x is None for x in xs):
        return "—"
    if len(xs) == 1:  # one seed: no spread to show
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def _label(m: str, row: dict, seeds: list) -> str:
    """The method's name, with its seeds when they are not the comparison's (a study's arm of fewer seeds)."""
    own = row.get("seeds", seeds)
    return m if own == seeds else f"{m} (seed{'s' if len(own) > 1 else ''} {', '.join(map(str, own))})"


def write(out_dir: Path, model: str, summary: dict, runs: dict, command: str, failed=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Methods on {model}, seeds {', '.join(map(str, summary['seeds']))}", "", f"Command: `{command}`", "",
             "| method | lr | OP | BWT | FWT | caption retention | answer leak | bare answer | unseen-prompt "
             "retention | VQA retention | VQA retention, unseen phrasings | worst task when learned | trainable "
             "| peak MB | time (s) |", "|---" * 15 + "|"]
    for m, r in summary["methods"].items():
        cells = KEYS + LEAK_KEYS + MORE_KEYS + ("min_own_task",)
        label = _label(m, r, summary["seeds"])
        lines.append(f"| {label} | {r['lr']:g} | " + " | ".join(_mean_std(r.get(k, [None])) for k in cells) +
                     f" | {r['trainable_fraction']:.4%} | {r['peak_memory_mb']:.0f} | "
                     f"{statistics.mean(r['time_s']):.0f} |")
    if summary.get("unfinished"):
        lines += ["", f"Not finished (left out: a run of each is still to make): {', '.join(summary['unfinished'])}."]
    if failed:
        lines += ["", "Runs that failed (left out of the table; their logs are in their run directories):", ""]
        lines += [f"- {o.key[0]}, seed {o.key[1]}, lr {o.key[2]:g}: {o.error}" for o in failed]
    lines += ["", "Of the captions after the last task: answer leak = the share that use a word only the tasks' "
              "answers use (the reference captions never do); bare answer = the share that are nothing but a task "
              "answer. Unseen-prompt retention: the mean over the caption prompts no method is given of each one's "
              "CIDEr after the last task over before; VQA retention: general-VQA accuracy after the last task over "
              "before (all questions, then those asked in phrasings no method is given); worst task when learned: "
              "the lowest score of a task right after it was learned (min R[i][i]).",
              "", "![retention against OP](retention_vs_op.png)", "", "![CIDEr across stages](cider.png)", ""]
    (out_dir / "table.md").write_text("\n".join(lines))
    seeds = summary["seeds"]
    over = f"seed {seeds[0]}" if len(seeds) == 1 else "mean over seeds"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    style = {m: {"color": plt.cm.tab20(i % 20), "marker": "osD^v<>ph*"[i % 10]}  # twelve methods, no repeats
             for i, m in enumerate(summary["methods"])}
    for m, r in summary["methods"].items():
        ax.errorbar(statistics.mean(r["OP"]), statistics.mean(r["caption_retention"]), xerr=statistics.pstdev(r["OP"]),
                    yerr=statistics.pstdev(r["caption_retention"]), fmt=style[m]["marker"], color=style[m]["color"],
                    label=_label(m, r, summary["seeds"]), capsize=3)
    ax.set_xlabel(f"OP ({over})")
    ax.set_ylabel(f"caption retention ({over})")
    ax.set_xlim(0, 1.05)  # both are shares: a fixed frame, so one method's point is not blown up to fill the plot
    ax.set_ylim(0, max(1.1, max(statistics.mean(r["caption_retention"]) for r in summary["methods"].values()) + 0.1))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    fewer = any(_label(m, r, seeds) != m for m, r in summary["methods"].items())  # an arm of its own seeds
    ax.set_title(f"{model}, {out_dir.name}\none point per method "
                 f"({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}"
                 f"{' unless the legend says' if fewer else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="best")  # where no point is: a method that forgets everything sits in the bottom left
    fig.tight_layout()
    place_labels(fig, ax, [(m, (statistics.mean(r["OP"]), statistics.mean(r["caption_retention"])), style[m]["color"])
                           for m, r in summary["methods"].items()])  # the legend's colours are close: name each point
    fig.savefig(out_dir / "retention_vs_op.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    skipped = []  # the methods whose stages between the first and the last were not scored
    for m, r in runs.items():
        curves = [[g.get("CIDEr") for g in [x["general"]["before"]] + x["general"]["after"]] for x in r["metrics"]]
        # the stages every seed scored (a run with --eval-general last scored the first and the last only)
        points = [(i, statistics.mean(c)) for i, c in enumerate(zip(*curves)) if None not in c]
        if len(points) < len(curves[0]):
            skipped.append(m)
        ax.plot(*zip(*points), label=_label(m, summary["methods"].get(m, {}), summary["seeds"]), **style[m])
    stages = ["before"] + runs[next(iter(runs))]["metrics"][0]["tasks"]
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel(f"held-out CIDEr ({over})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room above the curves, which start at the top, for the legend
    when = ("after each task" if not skipped else
            "before and after the sequence\n(the stages between were not scored)" if len(skipped) == len(runs) else
            f"after each task\n({len(skipped)} of {len(runs)} methods scored before and after the sequence only: "
            "a straight line")
    ax.set_title(f"{model}, {out_dir.name}\nheld-out CIDEr {when}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / "cider.png", dpi=110)
    plt.close(fig)


def _numbers(flag: str, text: str, kind):
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if not values or any(v < 0 or (kind is float and v == 0) for v in values):
        raise InputError(f"{flag} {text!r}: expected one or more {'positive' if kind is float else 'non-negative'} "
                         f"{kind.__name__}s")
    return values


def _chosen_lrs(path: Path, methods: list[str]) -> dict[str, float]:
    """{method: lr} from an earlier summary.json; every method asked for must be in it with a positive lr."""
    try:
        rows = json.loads(path.read_text())["methods"]
    except FileNotFoundError:
        raise InputError(f"--lr-from {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputError(f"--lr-from {path}: not a summary.json of piece_mm.experiments.compare "
                         f"({type(e).__name__}: {e})") from None
    out = {}
    for m in methods:
        row = rows.get(m) if isinstance(rows, dict) else None
        if not isinstance(row, dict):
            raise InputError(f"--lr-from {path}: no method {m!r} in field 'methods'")
        lr = row.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise InputError(f"--lr-from {path}: field 'methods.{m}.lr' is {lr!r}; expected a positive number")
        out[m] = float(lr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava")
    ap.add_argument("--methods", default="all", help=f"comma-separated, or all ({', '.join(ALL)})")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="3.0e-4,1.0e-3,3.0e-3", help="the lr sweep every method gets on the first seed")
    ap.add_argument("--lr-from", type=Path, help="an earlier summary.json: each method runs at the lr chosen there, "
                    "with no sweep")
    ap.add_argument("--output", type=Path, help="default: results/world-<model>")
    ap.add_argument("--tasks", default="world")
    ap.add_argument("--data-root", help="what a recipe's paths are relative to (--tasks paper-vqav2; docs/paper.md)")
    ap.add_argument("--grad-accum", type=int, default=1, help="every run's micro-batches per step (memory)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="every run's activations recomputed")
    ap.add_argument("--max-steps", type=int, help="cap on steps per task, the same for every method")
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--budget", help="a budget YAML (or a name in configs/budgets) for every run of a sparse method")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each when > 1")
    args = ap.parse_args(argv)
    try:
        seeds = _numbers("--seeds", args.seeds, int)
        lrs = _numbers("--lrs", args.lrs, float)
        known = sorted(METHODS)
        methods = [m for m in ALL if m in known] if args.methods == "all" else args.methods.split(",")
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise InputError(f"--methods: {unknown[0]!r} is not a method of piece_mm; known: {', '.join(known)}")
        if args.jobs < 1:
            raise InputError(f"--jobs: {args.jobs}; expected a positive integer")
        for m in methods:  # the numbers every run gets, checked once here (file, field and value)
            RunConfig(model=args.model, method=m, tasks=args.tasks, max_steps=args.max_steps,
                      eval_limit=args.eval_limit, grad_accum=args.grad_accum)
        if args.budget:
            load_budget(args.budget)
        from piece_mm.errors import from_data
        from piece_mm.tasks.sequence import load_sequence
        with from_data():  # a wrong data root or a missing file: one line, before any run starts
            load_sequence(args.tasks, data_root=args.data_root)
        fixed = _chosen_lrs(args.lr_from, methods) if args.lr_from else None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output = args.output or Path("results") / f"world-{args.model}"
    args.output.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    sweep = {m: [fixed[m]] if fixed else lrs for m in methods}
    runs, failed = run_all(args, methods, seeds, sweep, threads)
    if not runs:
        print(f"error: every run failed ({len(failed)}); the first: {failed[0].error}", file=sys.stderr)
        return 2 if all(o.bad_input for o in failed) else 1
    summary = summarise(runs, seeds)
    if failed:
        summary["failed"] = [{"method": o.key[0], "seed": o.key[1], "lr": o.key[2], "error": o.error} for o in failed]
    write(args.output, args.model, summary, runs,
          "python -m piece_mm.experiments.compare " + " ".join(argv if argv is not None else sys.argv[1:]), failed)
    print(f"wrote {args.output / 'summary.json'}, {args.output / 'table.md'}")
    if failed:
        print(f"{len(failed)} run(s) failed; the others are in the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
