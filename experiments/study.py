"""python -m piece_mm.experiments.study configs/studies/shared.yaml --model llava [--output DIR] [--jobs 2]

A comparison of named arms, each a method with its own budget, exclusions, constants and lr grid, on one sequence, under
one lr rule (experiments/policies.py, choose_lr): the highest OP among the runs that keep caption retention >= 0.90,
else the highest retention; ties go to the lower lr. An arm's lr grid is widened until the choice is not at its edge: a
choice at an edge gets the next point, the edge's ratio to its neighbour further out (rounded to one digit), up to
`max_extensions` times, so that every choice is bracketed. A constant given as a list (EWC's lambda, LwF's weight) is
then tried at each of its values at the chosen lr (its middle value during the lr search), and the rule picks it too,
its list widened the same way when the choice is at an edge (weight 3 of [0.3, 1, 3] gets 9). The other seeds run at the
chosen lr and constant. Rounds of runs go `--jobs` at a time (experiments/runs.py). A run's directory is named by what
it is (method, budget, exclusions, order, lr, constant, seed), so two arms that ask for the same run share it; a
finished run is read back, not rerun, so an interrupted study continues where it stopped.

The study file (configs/studies/*.yaml):
    tasks: world-shared          # the sequence (an "@order" suffix picks another order; tasks/sequence.py)
    seeds: [0, 1, 2]
    eval_limit: 100              # test examples per task, and of the general captions and questions each
    eval_general: last           # the general set after every task (every, the default) or the last only: every
                                 # retention is read there; the runs take about a fifth less time
    steps: null                  # steps per task for every arm (null: each method's default)
    retention: 0.90              # the rule's floor on caption retention
    runs: results/shared-{model}/runs   # where the run directories go (default: <output>/runs); another study's,
                                        # to share its runs
    arms:
      - name: lwf                # the label in the tables
        method: lwf
        lrs: [1.0e-4, 3.0e-4, 1.0e-3]
        settings: {temperature: 2.0, weight: [0.3, 1.0, 3.0]}   # configs/methods/<method>.yaml's fields
        exclude: budget          # --exclude (dense and LoRA methods)
        budget: default          # --budget (sparse methods)
        tasks: world-shared@reverse   # this arm's own sequence (default: the study's)
        seeds: [0]               # this arm's own seeds (default: the study's)
        rule: op                 # the highest OP whatever the retention (multitask, the upper bound)

--finished writes the tables from the runs already finished and starts none (a study still going, or stopped): an
arm with any run still to make (its grid, an extension, a constant, a seed) is left out and named in the table.

Writes summary.json (compare's format, one "method" per arm, with each arm's method, chosen lr and constants, and
every grid point tried on the first seed), table.md, retention_vs_op.png and cider.png. Exit 0 when every run
finished, 1 when some failed (the others are in the table), 2 on bad input."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml

from piece_mm.errors import InputError
from piece_mm.methods import METHODS
from piece_mm.runconfig import RunConfig

from .compare import summarise, write
from .runs import Job, Outcome, run_jobs

ARM_KEYS = {"name", "method", "lrs", "settings", "exclude", "budget", "tasks", "seeds", "rule"}
TOP_KEYS = {"tasks", "seeds", "eval_limit", "eval_general", "steps", "retention", "max_extensions", "arms", "runs"}


def load_study(path: Path) -> dict:
    """The study file, checked field by field (file, field, value in every error)."""
    try:
        study = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: study file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(study, dict) or not isinstance(study.get("arms"), list) or not study["arms"]:
        raise InputError(f"{path}: field 'arms' must be a non-empty list")
    unknown = sorted(set(study) - TOP_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown field {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
    study.setdefault("tasks", "world")
    study.setdefault("seeds", [0, 1, 2])
    study.setdefault("retention", 0.90)
    study.setdefault("max_extensions", 2)
    _ints(path, "seeds", study["seeds"])
    names = set()
    for i, arm in enumerate(study["arms"]):
        at = f"{path}: arms[{i}]"
        if not isinstance(arm, dict) or not isinstance(arm.get("name"), str) or not arm["name"]:
            raise InputError(f"{at} is {arm!r:.60}; expected a mapping with a 'name'")
        unknown = sorted(set(arm) - ARM_KEYS)
        if unknown:
            raise InputError(f"{at}: unknown field {unknown[0]!r}; known: {', '.join(sorted(ARM_KEYS))}")
        if arm["name"] in names:
            raise InputError(f"{at}.name {arm['name']!r} appears twice")
        names.add(arm["name"])
        if arm.get("method") not in METHODS:
            raise InputError(f"{at}.method is {arm.get('method')!r}; known: {', '.join(sorted(METHODS))}")
        lrs = arm.get("lrs")
        if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                           and x > 0 for x in lrs):
            raise InputError(f"{at}.lrs is {lrs!r:.60}; expected a list of positive numbers")
        arm["lrs"] = sorted(float(x) for x in lrs)
        if "seeds" in arm:
            _ints(path, f"arms[{i}].seeds", arm["seeds"])
        if arm.get("rule", "retention") not in ("retention", "op"):
            raise InputError(f"{at}.rule is {arm['rule']!r}; expected retention or op")
        s = arm.get("settings") or {}
        if not isinstance(s, dict):
            raise InputError(f"{at}.settings is {s!r:.60}; expected a mapping of the method's constants")
        tuned = [k for k, v in s.items() if isinstance(v, list)]
        if len(tuned) > 1:
            raise InputError(f"{at}.settings: {tuned[0]!r} and {tuned[1]!r} are both lists; one constant is tuned "
                             "per arm")
        if tuned and (not s[tuned[0]] or len(s[tuned[0]]) % 2 == 0):
            raise InputError(f"{at}.settings.{tuned[0]} is {s[tuned[0]]!r}; expected an odd number of values (the "
                             "middle one is used while the lr is chosen)")
    return study


def _ints(path, field, xs) -> None:
    if not isinstance(xs, list) or not xs or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                     for x in xs):
        raise InputError(f"{path}: field {field!r} is {xs!r:.60}; expected a list of non-negative integers")


def tuned(arm: dict) -> tuple[str | None, list]:
    """(the constant tuned by the arm, its values), or (None, [None])."""
    for k, v in (arm.get("settings") or {}).items():
        if isinstance(v, list):
            return k, v
    return None, [None]


def middle(arm: dict):
    """The tuned constant's value while the lr is chosen (its middle one), or None."""
    values = tuned(arm)[1]
    return values[len(values) // 2]


def settings_of(arm: dict, value) -> dict:
    key = tuned(arm)[0]
    s = dict(arm.get("settings") or {})
    if key is not None:
        s[key] = value
    return s


def tag(study: dict, arm: dict, lr: float, value, seed: int | None = None) -> str:
    """A run's directory name, from what the run is (method, budget, exclusions, order, lr, constant, seed), not from
    the arm's name: two arms that ask for the same run share it."""
    key = tuned(arm)[0]
    parts = [arm["method"]]
    if arm.get("budget"):
        parts.append(Path(str(arm["budget"])).stem)
    if arm.get("exclude"):
        parts.append("x" if arm["exclude"] == "budget" else "x" + hashlib.sha1(arm["exclude"].encode()).hexdigest()[:6])
    tasks = str(arm.get("tasks", study["tasks"]))
    if tasks != str(study["tasks"]):
        parts.append(tasks.rsplit("@", 1)[-1] if "@" in tasks else Path(tasks).stem)
    return "-".join(parts) + f"-lr{lr:g}" + (f"-{key}{value:g}" if key else "") + \
        ("" if seed is None else f"-seed{seed}")


def _round(x: float) -> float:
    """x to one significant digit (the grid's next point: 1e-3 * 1e-3 / 3e-4 -> 3e-3)."""
    return float(f"{x:.0e}")


def _widen(g: list, at) -> list:
    """The grid g with its next point past the edge `at` (the edge's ratio to its neighbour, one digit)."""
    return [_round(g[0] * g[0] / g[1])] + g if at == g[0] else g + [_round(g[-1] * g[-1] / g[-2])]


def choose(rows: list[tuple], floor: float, rule: str) -> tuple:
    """rows: [(lr, value, metrics)] -> the chosen row: the highest OP among those with caption retention >= floor,
    else the highest retention (policies.choose_lr's rule); rule "op": the highest OP. Ties: the lower lr, then the
    row given first."""
    def best(rs, what):
        return max(rs, key=lambda r: (r[2]["summary"][what], -r[0], -rs.index(r)))
    if rule == "op":
        return best(rows, "OP")
    kept = [r for r in rows if r[2]["summary"]["caption_retention"] >= floor]
    return best(kept, "OP") if kept else best(rows, "caption_retention")


def job(args, study: dict, arm: dict, lr: float, value, seed: int) -> Job:
    out = args.runs / tag(study, arm, lr, value, seed)
    config = {"model": args.model, "method": arm["method"], "seed": seed, "lr": lr,
              "tasks": arm.get("tasks", study["tasks"]), "output": out, "eval_limit": study.get("eval_limit")}
    if study.get("steps"):
        config["steps"] = study["steps"]
    if study.get("eval_general"):
        config["eval_general"] = study["eval_general"]
    for k in ("budget", "exclude"):
        if arm.get(k):
            config[k] = arm[k]
    s = settings_of(arm, value)
    if s:  # the method's constants (its configs/methods file, with the arm's on top), written beside the runs
        from piece_mm.methods import load_settings
        path = args.output / "settings" / f"{tag(study, arm, lr, value)}.yaml"
        if not args.finished:  # --finished starts no run, so it writes no run's settings either
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump({**load_settings(arm["method"]), **s}, sort_keys=True))
        config["method_config"] = str(path)
    return Job((arm["name"], lr, value, seed), config)


def run_study(args, study: dict, arms: list[dict]) -> tuple[dict, list, dict, dict, list]:
    """({arm: {"lr", "setting", "method", "metrics": [per seed]}}, failed outcomes, {arm: the first seed's grid},
    {"runs": how many distinct finished runs the study made or read back, "sum_s": their own run times added up},
    the arms left out with --finished because a run of theirs is still to make)."""
    done, failed, unfinished = {}, [], set()

    def run(jobs):
        todo = {}  # one job per run directory: arms that ask for the same run share it
        for j in jobs:
            if j.key not in done:
                todo.setdefault(str(j.config["output"]), []).append(j)
        if args.finished:  # read back what finished; start nothing, and leave out the arms with a run missing
            got = {}
            for js in todo.values():
                out = Path(js[0].config["output"])
                f = out / "metrics.json"
                got[js[0].key] = Outcome(js[0].key, out, metrics=json.loads(f.read_text()) if f.is_file() else None)
                if not f.is_file():
                    unfinished.update(j.key[0] for j in js)
        else:
            got = run_jobs([js[0] for js in todo.values()], args.jobs, 1 if args.jobs > 1 else None, _report)
        for js in todo.values():
            o = got[js[0].key]
            for j in js:
                done[j.key] = o
            if o.error:
                failed.append(o)

    def rows(a, pairs):  # the first seed's finished runs among pairs (lr, constant)
        got = [done.get((a["name"], lr, v, first(a))) for lr, v in pairs]
        return [(lr, v, o.metrics) for (lr, v), o in zip(pairs, got) if o is not None and o.metrics]

    def first(a):
        return a.get("seeds", study["seeds"])[0]

    grids = {a["name"]: list(a["lrs"]) for a in arms}
    extended = {a["name"]: 0 for a in arms}
    settled = {}
    while len(settled) < len(arms):  # the lr search: every arm's round runs together
        run([job(args, study, a, lr, middle(a), first(a)) for a in arms if a["name"] not in settled
             for lr in grids[a["name"]]])
        for a in arms:
            n, g = a["name"], grids[a["name"]]
            if n in settled:
                continue
            got = rows(a, [(lr, middle(a)) for lr in g])
            if not got:
                settled[n] = None
                continue
            lr = choose(got, study["retention"], a.get("rule", "retention"))[0]
            if len(g) > 1 and lr in (g[0], g[-1]) and extended[n] < study["max_extensions"]:
                extended[n] += 1
                grids[n] = _widen(g, lr)
            else:
                settled[n] = lr
    # the constants at the chosen lr, their list widened as the lrs were (a choice at its edge gets the next point,
    # as many times); with --finished an arm already short of a run is read too, for its grid
    ready = [a for a in arms if settled[a["name"]] is not None]
    values = {a["name"]: list(tuned(a)[1]) for a in ready}
    todo = [a for a in ready if tuned(a)[0]]
    widened = {a["name"]: 0 for a in todo}
    while todo:
        run([job(args, study, a, settled[a["name"]], v, first(a)) for a in todo for v in values[a["name"]]])
        for a in list(todo):
            n, vs = a["name"], values[a["name"]]
            at = rows(a, [(settled[n], v) for v in vs])
            v = choose(at, study["retention"], a.get("rule", "retention"))[1] if at else None
            if at and len(vs) > 1 and v in (vs[0], vs[-1]) and widened[n] < study["max_extensions"]:
                widened[n] += 1
                values[n] = _widen(vs, v)
            else:
                todo.remove(a)
    live = [a for a in ready if a["name"] not in unfinished]
    chosen, grid = {}, {}
    for a in ready:  # every point tried on the first seed (an unfinished arm's too: the runs it has so far)
        n, lr = a["name"], settled[a["name"]]
        tried = rows(a, [(x, middle(a)) for x in grids[n]])
        if tuned(a)[0]:
            at = rows(a, [(lr, v) for v in values[n]])
            if n not in unfinished:
                chosen[n] = choose(at, study["retention"], a.get("rule", "retention"))[:2]
            tried += [r for r in at if r[1] != middle(a)]
        else:
            chosen[n] = (lr, None)
        grid[n] = [{"lr": x, "setting": v, **{k: m["summary"].get(k) for k in
                                              ("OP", "BWT", "caption_retention", "caption_retention_unseen",
                                               "vqa_retention")}} for x, v, m in tried]
    run([job(args, study, a, *chosen[a["name"]], s) for a in live for s in a.get("seeds", study["seeds"])[1:]])
    live = [a for a in live if a["name"] not in unfinished]
    runs = {}
    for a in live:
        n, (lr, v) = a["name"], chosen[a["name"]]
        ms = [done[(n, lr, v, s)].metrics for s in a.get("seeds", study["seeds"]) if done[(n, lr, v, s)].metrics]
        runs[n] = {"lr": lr, "metrics": ms, "setting": settings_of(a, v), "method": a["method"]}
    times = {str(o.output): o.metrics.get("time_s") or 0.0 for o in done.values() if o.metrics}  # finished runs
    return (runs, failed, grid, {"runs": len(times), "sum_s": round(sum(times.values()), 1)},
            [a["name"] for a in arms if a["name"] in unfinished])


def grid_table(summary: dict, arms: list[dict]) -> str:
    """Markdown: every point each arm tried on its first seed, in the order tried, the rule's choice in bold; an
    arm left out by --finished shows the points it has so far, marked "(unfinished)", none in bold."""
    lines = ["", "## Each arm's grid on its first seed (the rule's choice in bold)", "",
             f"Rule: {summary['rule']}.", "",
             "| arm | lr | constant | OP | BWT | caption retention | unseen-prompt retention | VQA retention |",
             "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        row = summary["methods"].get(a["name"])
        points = row["grid"] if row else summary.get("unfinished_grid", {}).get(a["name"], [])
        name = tuned(a)[0]
        for g in points:
            chosen = row is not None and g["lr"] == row["lr"] and (
                name is None or g["setting"] == (row["settings"] or {}).get(name))
            cells = [f"{g['lr']:g}", "—" if name is None else f"{name} {g['setting']:g}"] + [
                "—" if g.get(k) is None else f"{g[k]:.3f}" for k in
                ("OP", "BWT", "caption_retention", "caption_retention_unseen", "vqa_retention")]
            label = a["name"] if row else f"{a['name']} (unfinished)"
            lines.append(f"| {label} | " + " | ".join(f"**{c}**" if chosen else c for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _report(o) -> None:
    if o.error:
        print(f"failed: {o.key}: {o.error}", file=sys.stderr, flush=True)
    elif o.metrics:
        s = o.metrics["summary"]
        print(f"{o.key[0]:<16} lr {o.key[1]:g}{'' if o.key[2] is None else f' ({o.key[2]:g})'} seed {o.key[3]}: "
              f"OP {s['OP']:.3f}  BWT {s['BWT']:+.3f}  retention {s['caption_retention']:.3f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.study", description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the study YAML (configs/studies/)")
    ap.add_argument("--model", default="llava")
    ap.add_argument("--output", type=Path, help="default: results/<study>-<model>")
    ap.add_argument("--arms", help="comma-separated names: run only these arms")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each when > 1")
    ap.add_argument("--finished", action="store_true",
                    help="write the tables from the runs already finished and start none: an arm with a run still "
                         "to make is left out, and named")
    args = ap.parse_args(argv)
    try:
        study = load_study(args.study)
        arms = study["arms"]
        if args.arms:
            names = args.arms.split(",")
            bad = [n for n in names if n not in {a["name"] for a in arms}]
            if bad:
                raise InputError(f"--arms: {bad[0]!r} is not an arm of {args.study}")
            arms = [a for a in arms if a["name"] in names]
        if args.jobs < 1:
            raise InputError(f"--jobs: {args.jobs}; expected a positive integer")
        from piece_mm.errors import from_data
        from piece_mm.methods import load_settings
        from piece_mm.select import load_budget
        from piece_mm.tasks.sequence import load_sequence
        from piece_mm.train import frozen_patterns
        for i, a in enumerate(arms):  # every run's flags, checked before any starts
            cfg = RunConfig(model=args.model, method=a["method"], tasks=a.get("tasks", study["tasks"]),
                            eval_limit=study.get("eval_limit"), steps=study.get("steps"), exclude=a.get("exclude"),
                            eval_general=study.get("eval_general") or "every",
                            budget=a.get("budget"))
            with from_data():
                load_sequence(cfg.tasks)
            frozen_patterns(cfg, cfg.budget or "default")
            if a.get("budget"):
                load_budget(a["budget"])
            known = load_settings(a["method"])
            bad = sorted(set(a.get("settings") or {}) - set(known))
            if bad:
                raise InputError(f"{args.study}: arms[{i}].settings.{bad[0]}: not a constant of {a['method']}; "
                                 f"known: {', '.join(known) or 'none'}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output = args.output or Path("results") / f"{args.study.stem}-{args.model}"
    args.runs = Path(str(study["runs"]).format(model=args.model)) if study.get("runs") else args.output / "runs"
    args.output.mkdir(parents=True, exist_ok=True)
    runs, failed, grids, cost, unfinished = run_study(args, study, arms)
    if not runs and args.finished:
        print(f"error: no arm of {args.study} has all its runs finished in {args.runs}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: every run failed ({len(failed)}); the first: {failed[0].error if failed else '?'}",
              file=sys.stderr)
        return 1
    summary = summarise(runs, study["seeds"])
    for n, r in runs.items():
        row = summary["methods"][n]
        row.update(method=r["method"], settings=r["setting"], grid=grids.get(n, []),
                   seeds=[m["seed"] for m in r["metrics"]], tasks=r["metrics"][0]["tasks"])
    n = study["max_extensions"]
    summary["rule"] = (f"the highest OP among the first seed's runs with caption retention >= {study['retention']:g}, "
                       "else the highest retention; ties: the lower lr; a choice at the edge of its lr grid or "
                       f"constant list gets the next point (at most {n} time{'' if n == 1 else 's'})")
    # what the study cost: each run's own time (one thread each with --jobs 2), added up over every run it made or
    # read back; on two cores, two at a time, the wall time is about half of it
    summary["run_time"] = cost
    if unfinished:
        summary["unfinished"] = unfinished
        # what an unfinished arm has tried so far on its first seed (no choice made yet)
        summary["unfinished_grid"] = {n: grids[n] for n in unfinished if grids.get(n)}
    if failed:
        summary["failed"] = [{"method": o.key[0], "lr": o.key[1], "setting": o.key[2], "seed": o.key[3],
                              "error": o.error} for o in failed]
    command = "python -m piece_mm.experiments.study " + " ".join(argv if argv is not None else sys.argv[1:])
    write(args.output, args.model, summary, runs, command, [])
    with open(args.output / "table.md", "a") as f:
        f.write(grid_table(summary, arms))
    print(f"wrote {args.output / 'summary.json'}, {args.output / 'table.md'} ({cost['runs']} runs, "
          f"{cost['sum_s'] / 3600:.1f} h of run time added up)")
    if unfinished:
        print(f"left out, a run still to make: {', '.join(unfinished)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed; the others are in the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
