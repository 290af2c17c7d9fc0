"""python -m piece_mm.experiments.sweep --model llava [--grid configs/sweeps/world.yaml] [--output results/sweep-llava]
    [--jobs 2]

Runs the default sequence once per setting of a grid (budget per component × lr × steps for the sparse methods, lr
for SeqFT; the grid's optional `exclude` list and `distill` mapping go into every budget), each run in a process of
its own (experiments/runs.py: a run that fails is reported and the others go on), and writes sweep.json, table.md and
frontier.png: caption retention against own-task accuracy (mean of R[i][i]), one point per setting. A setting whose
run already finished (metrics.json present) is read back, not rerun, so an interrupted sweep continues where it
stopped; a run made with another budget is refused. Exit 0 when every setting ran, 1 when some failed (the others
are in the table), 2 on bad input."""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import yaml

from piece_mm.budget import Budget
from piece_mm.configs import DIR as CONFIGS
from piece_mm.errors import InputError
from piece_mm.runconfig import RunConfig

from .runs import run_jobs

GRID_DIR = CONFIGS / "sweeps"


def settings(grid: dict) -> list[dict]:
    """One dict per run: tag, method, lr, steps and (sparse methods) the budget fields to write."""
    out = []
    for method in grid.get("methods", ["piece-f"]):
        for llm, proj, vis, lr, steps in itertools.product(grid["llm"], grid.get("projector", [0.0]),
                                                           grid.get("vision", [0.0]), grid["lr"], grid["steps"]):
            budget = {"fractions": {"vision": vis, "projector": proj, "llm": llm}}
            if "exclude" in grid:  # regexes of weights never chosen, as in a budget YAML
                budget["exclude"] = list(grid["exclude"])
            if "distill" in grid:  # the distillation term, as in a budget YAML (Budget checks it)
                budget["distill"] = grid["distill"]
            tag = f"{method}-llm{llm:g}-proj{proj:g}-vis{vis:g}-lr{lr:g}-s{steps}"
            out.append({"tag": tag, "method": method, "lr": lr, "steps": steps, "budget": budget})
    for lr, steps in itertools.product(grid.get("seqft_lr", []), grid.get("seqft_steps", grid["steps"])):
        out.append({"tag": f"seqft-lr{lr:g}-s{steps}", "method": "seqft", "lr": lr, "steps": steps, "budget": None})
    return out


def _job(model: str, tasks: str, s: dict, out: Path, eval_limit: int | None):
    """The run of setting `s`, its budget written beside it; a finished run made with another budget is refused."""
    from .runs import Job
    run_dir = out / "runs" / s["tag"]
    bpath = out / "budgets" / f"{s['tag']}.yaml"
    if s["budget"] and (run_dir / "metrics.json").is_file() and (
            not bpath.is_file() or yaml.safe_load(bpath.read_text()) != s["budget"]):
        raise InputError(f"setting {s['tag']}: {run_dir} was made with another budget than {bpath.name} would "
                         f"now hold (exclude?); use another --output")
    config = {"model": model, "method": s["method"], "lr": s["lr"], "steps": s["steps"], "tasks": tasks,
              "output": run_dir, "eval_limit": eval_limit}
    if s["budget"]:
        if not (run_dir / "metrics.json").is_file():
            bpath.parent.mkdir(parents=True, exist_ok=True)
            bpath.write_text(yaml.safe_dump(s["budget"]))
        config["budget"] = str(bpath)
    return Job(s["tag"], config)


def _row(s: dict, m: dict) -> dict:
    R = m["scores"]
    own = [R[i + 1][i] for i in range(len(m["tasks"]))]
    return {**{k: s[k] for k in ("tag", "method", "lr", "steps")}, "fractions": (s["budget"] or {}).get("fractions"),
            "exclude": (s["budget"] or {}).get("exclude"),
            "own_task": sum(own) / len(own), "min_own_task": min(own), **m["summary"],
            "VQA_retention": m["general"]["after"][-1].get("VQA", float("nan")) /
            max(m["general"]["before"].get("VQA", float("nan")), 1e-9), "trainable": m["trainable"]["total"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava")
    ap.add_argument("--grid", default=str(GRID_DIR / "world.yaml"),
                    help="grid YAML (default: configs/sweeps/world.yaml)")
    ap.add_argument("--output", type=Path, help="default: results/sweep-<model>")
    ap.add_argument("--tasks", default="world", help="sequence YAML or name (default: world)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each when > 1")
    args = ap.parse_args(argv)
    try:
        path = Path(args.grid)
        if not path.is_file():
            raise InputError(f"--grid {args.grid!r}: file not found")
        grid = yaml.safe_load(path.read_text())
        for f in ("llm", "lr", "steps"):
            if not isinstance(grid, dict) or not isinstance(grid.get(f), list) or not grid[f]:
                raise InputError(f"{path}: field {f!r} must be a non-empty list")
        for f in ("llm", "projector", "vision", "lr", "steps", "seqft_lr", "seqft_steps"):
            for v in grid.get(f, []) if isinstance(grid.get(f, []), list) else [grid[f]]:
                if not isinstance(v, (int, float)) or isinstance(v, bool):  # YAML reads 1e-3 (no dot) as a string
                    raise InputError(f"{path}: {f} holds {v!r}; expected numbers (write 1.0e-3, not 1e-3)")
        if "exclude" in grid and (not isinstance(grid["exclude"], list)
                                  or not all(isinstance(x, str) for x in grid["exclude"])):
            raise InputError(f"{path}: exclude is {grid['exclude']!r}; expected a list of regexes")
        if args.jobs < 1:
            raise InputError(f"--jobs: {args.jobs}; expected a positive integer")
        todo = settings(grid)
        for s in todo:  # every setting's numbers, checked once here (file, field and value)
            RunConfig(model=args.model, method=s["method"], lr=s["lr"], steps=s["steps"], tasks=args.tasks,
                      eval_limit=grid.get("eval_limit"))
            if s["budget"]:
                Budget.from_dict(s["budget"], where=f"{path} (setting {s['tag']})")
        out = args.output or Path("results") / f"sweep-{args.model}"
        jobs = [_job(args.model, args.tasks, s, out, grid.get("eval_limit")) for s in todo]
    except (InputError, yaml.YAMLError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    print(f"{len(todo)} settings on {args.model}, {args.jobs} at a time -> {out}", flush=True)

    def report(o) -> None:
        if o.error:
            print(f"failed: setting {o.key}: {o.error}", file=sys.stderr, flush=True)

    done = run_jobs(jobs, args.jobs, threads, report)
    failed = [done[s["tag"]] for s in todo if done[s["tag"]].error]
    rows = [_row(s, done[s["tag"]].metrics) for s in todo if done[s["tag"]].metrics]
    if not rows:
        print(f"error: every setting failed ({len(failed)}); the first: {failed[0].error}", file=sys.stderr)
        return 2 if all(o.bad_input for o in failed) else 1
    for r in rows:
        print(f"{r['tag']:<45} own-task {r['own_task']:.3f} (min {r['min_own_task']:.2f})  retention "
              f"{r['caption_retention']:.3f}  BWT {r['BWT']:+.3f}", flush=True)
    from piece_mm.eval.report import write_sweep
    about = {"grid": os.path.relpath(path), "command": "python -m piece_mm.experiments.sweep " +
             " ".join(argv if argv is not None else sys.argv[1:])}
    if failed:
        about["failed"] = {o.key: o.error for o in failed}
    write_sweep(out, args.model, rows, about)
    print(f"wrote {out / 'sweep.json'}, {out / 'table.md'}, {out / 'frontier.png'}")
    if failed:
        print(f"{len(failed)} setting(s) failed; the others are in the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
