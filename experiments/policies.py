"""python -m piece_mm.experiments.policies [--models llava,qwen2-vl] [--output results/policies] [--jobs 2]

The modality-aware claim, measured: up to five ways to spend one total budget of PIECE-F weights, at equal totals.
- global: one top-k over every scorable weight (the PIECE code's pool);
- llm: all of it in the LLM (blocks + lm_head), as the default budget does;
- llm+projector: the same fraction of the LLM and of the projector;
- proportional: the same fraction of each of the three components;
- auto: `pool: auto`, split among the components by their share of the task's score mass (piece_mm/select.py).
The total is a fraction of every scorable weight (--totals, default 0.1, 0.3, 1 and 3 %), so each policy tunes the
same number of weights per task. Every budget otherwise is the default's (keys and token embeddings left out, the
distillation term on), with --score-examples examples scored per task.

lr: each policy runs at each lr of --lrs on seed 0 at each --choose-at total (1 and 3 %), and keeps there the one
with the highest OP among those that keep caption retention >= 0.90 (none does: the highest retention); another
total takes the choice of the nearest of them (0.1 and 0.3 % take 1 %'s). Seeds: --seeds at the --seeded totals
(1 and 3 %), seed 0 at the others. The runs are the default
sequence at --steps steps of --batch-size examples (fewer than the default's 300 x 16, so that the study fits in
90 min on 2 cores).

Writes policies.json (every run: OP, BWT, caption and VQA retention, the component split and the per-layer counts of
every task's mask, the overlap of successive tasks' masks), table.md, and per model retention_vs_op-<m>.png,
shares-<m>.png (where the global pool's budget goes, task by task) and overlap-<m>.png. A finished run is read
back, not rerun. Exit 0 when every run finished, 1 when some failed (the others are in the tables), 2 on bad
input."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from piece_mm.budget import Budget
from piece_mm.components import COMPONENTS
from piece_mm.errors import InputError
from piece_mm.runconfig import RunConfig

from .runs import Job, run_jobs

POLICIES = ("global", "llm", "llm+projector", "proportional", "auto")
RETENTION_TARGET = 0.90  # the lr rule's floor on caption retention: the default run's target


def eligible_sizes(model: str, exclude: list[str], rules: dict | None = None) -> dict[str, int]:
    """{component: scorable elements} of the model under the budget's exclusions, from its config alone (a model
    on the meta device, as piece_mm.plan builds it: no weights are read)."""
    import torch

    from piece_mm.components import split_components
    from piece_mm.plan import load_config, meta_model

    m = meta_model(load_config(model), torch.float32)
    named = dict(m.named_parameters())
    parts = split_components(m, exclude=exclude, rules=rules)
    return {c: sum(named[n].numel() for n in parts[c]) for c in COMPONENTS}


def policy_budget(policy: str, total: float, sizes: dict[str, int], base: dict) -> dict:
    """The budget YAML's mapping for `policy` at `total` (a fraction of every scorable weight): the same number of
    weights per task under each policy, up to rounding."""
    n = sum(sizes.values())
    over = {"global": ("vision", "projector", "llm"), "llm": ("llm",), "llm+projector": ("projector", "llm"),
            "proportional": ("vision", "projector", "llm"), "auto": ("vision", "projector", "llm")}[policy]
    b = dict(base)
    if policy in ("global", "auto"):
        b.update(pool=policy, total=total, fractions={c: 0.0 for c in COMPONENTS})
    else:
        f = total * n / sum(sizes[c] for c in over)
        if f > 1:
            raise InputError(f"--totals {total:g}: policy {policy} would need {f:.3g} of its components; expected <= 1")
        b.update(pool="component", fractions={c: (f if c in over else 0.0) for c in COMPONENTS})
    return b


def choose_lr(rows: list[dict]) -> dict:
    """The row whose lr a policy keeps: the highest OP among those with caption retention >= 0.90, else the highest
    retention; ties go to the lower lr, whatever the rows' order."""
    kept = [r for r in rows if r["caption_retention"] >= RETENTION_TARGET]
    if kept:
        return max(kept, key=lambda r: (r["OP"], -r["lr"]))
    return max(rows, key=lambda r: (r["caption_retention"], -r["lr"]))


def row(key: tuple, m: dict) -> dict:
    """One run's numbers: its summary, VQA retention, and where each task's mask lies."""
    model, policy, total, lr, seed = key
    before = m["general"]["before"].get("VQA")
    vqa = m["general"]["after"][-1].get("VQA") / before if before else float("nan")
    split = [{c: s[c]["chosen"] for c in COMPONENTS} for s in m["selection"]]
    layers = [{c: s[c]["layers"] for c in COMPONENTS} for s in m["selection"]]
    J = m["mask_jaccard"]
    return {"model": model, "policy": policy, "total": total, "lr": lr, "seed": seed, "OP": m["summary"]["OP"],
            "BWT": m["summary"]["BWT"], "caption_retention": m["summary"]["caption_retention"],
            "VQA_retention": vqa, "own_task": [m["scores"][i + 1][i] for i in range(len(m["tasks"]))],
            "tasks": m["tasks"], "split": split, "layers": layers,
            "overlap": [J[i][i + 1] for i in range(len(J) - 1)]}


def _mean_sd(xs: list[float]) -> str:
    mean = round(statistics.mean(xs), 3) + 0.0  # + 0.0: no "-0.000"
    return f"{mean:.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{mean:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.policies", description=__doc__.splitlines()[2])
    ap.add_argument("--models", default="llava,qwen2-vl")
    ap.add_argument("--totals", default="0.001,0.003,0.01,0.03", help="fractions of every scorable weight")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--lrs", default="1.0e-3,3.0e-3", help="each policy's lr grid (seed 0, at --choose-at)")
    ap.add_argument("--choose-at", default="0.01,0.03",
                    help="the totals where each policy's lr is chosen; another total takes the nearest one's")
    ap.add_argument("--seeds", default="0,1,2", help="seeds at the --seeded totals (seed 0 elsewhere)")
    ap.add_argument("--seeded", default="0.01,0.03", help="the totals run with every seed of --seeds")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=40)
    ap.add_argument("--score-examples", type=int, default=200)
    ap.add_argument("--budget", default="default", help="the budget every policy starts from (exclude, distill)")
    ap.add_argument("--tasks", default="world", help="sequence YAML or name (default: world)")
    ap.add_argument("--output", type=Path, default=Path("results") / "policies")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        policies = [p for p in args.policies.split(",") if p]
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            raise InputError(f"--policies: {bad[0]!r} is not a policy; expected some of {', '.join(POLICIES)}")
        totals, lrs, seeds = _floats("--totals", args.totals), _floats("--lrs", args.lrs), _ints("--seeds", args.seeds)
        seeded, choose_at = _floats("--seeded", args.seeded), _floats("--choose-at", args.choose_at)
        for flag, ts in (("--choose-at", choose_at), ("--seeded", seeded)):
            if set(ts) - set(totals):
                raise InputError(f"{flag} {min(set(ts) - set(totals)):g}: not one of --totals ({args.totals})")
        if 0 not in seeds:
            raise InputError(f"--seeds {args.seeds!r}: must hold seed 0 (the lr is chosen on it)")
        if args.jobs < 1:
            raise InputError(f"--jobs: {args.jobs}; expected a positive integer")
        base = Budget.from_yaml(args.budget).to_dict()
        base = {k: base[k] for k in ("exclude", "components", "score_batch_size", "betas", "weight_decay",
                                     "distill")} | {"score_examples": args.score_examples}
        for m in models:  # an unknown model, bad steps or the like: one line before anything runs
            RunConfig(model=m, steps=args.steps, batch_size=args.batch_size, eval_limit=args.eval_limit, lr=lrs[0],
                      tasks=args.tasks)
        sizes = {m: eligible_sizes(m, base["exclude"], base["components"]) for m in models}
        budgets = {(m, p, t): policy_budget(p, t, sizes[m], base) for m in models for p in policies for t in totals}
        for key, b in budgets.items():
            Budget.from_dict(b, where=f"policy {key[1]} at {key[2]:g} on {key[0]}")
    except InputError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    out = args.output
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    try:  # every budget checked against the finished runs before any file is written
        texts = {key: yaml.safe_dump(b) for key, b in budgets.items()}
        for (m, p, t), text in texts.items():
            bpath = out / "budgets" / f"{m}-{p}-{t:g}.yaml"
            made = [d for d in (out / "runs").glob(f"{m}-{p}-{t:g}-lr*") if (d / "metrics.json").is_file()]
            if made and (not bpath.is_file() or bpath.read_text() != text):
                raise InputError(f"{made[0]} was made with another budget than {bpath} would now hold (another "
                                 "--budget or --score-examples?); use another --output")
    except InputError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    def job(key):
        m, p, t, lr, seed = key
        bpath = out / "budgets" / f"{m}-{p}-{t:g}.yaml"
        bpath.parent.mkdir(parents=True, exist_ok=True)
        bpath.write_text(texts[(m, p, t)])
        return Job(key, {"model": m, "method": "piece-f", "budget": str(bpath), "lr": lr, "seed": seed,
                         "steps": args.steps, "batch_size": args.batch_size, "eval_limit": args.eval_limit,
                         "tasks": args.tasks, "output": out / "runs" / f"{m}-{p}-{t:g}-lr{lr:g}-seed{seed}"})

    def report(o) -> None:
        print(f"failed: {o.key}: {o.error}" if o.error else f"done: {o.key}", file=sys.stderr, flush=True)

    print(f"{len(models)} models x {len(policies)} policies x {len(totals)} totals; lr from {lrs} at "
          f"{args.choose_at}; seeds {seeds} at {args.seeded} -> {out}", flush=True)
    first = [(m, p, c, lr, 0) for m in models for p in policies for c in choose_at for lr in lrs]
    done = run_jobs([job(k) for k in first], args.jobs, threads, report)
    rows = {k: row(k, o.metrics) for k, o in done.items() if o.metrics}
    chosen = {}  # (model, policy, total): lr
    for m in models:
        for p in policies:
            for c in choose_at:
                tried = [rows[k] for k in first if k[:3] == (m, p, c) and k in rows]
                if tried:
                    chosen[(m, p, c)] = choose_lr(tried)["lr"]
            for t in totals:
                c = nearest(t, [c for c in choose_at if (m, p, c) in chosen])
                if c is not None:
                    chosen[(m, p, t)] = chosen[(m, p, c)]
    rest = [(m, p, t, lr, s) for (m, p, t), lr in chosen.items() for s in seeds
            if (s == 0 and t not in choose_at) or (s != 0 and t in seeded)]
    done.update(run_jobs([job(k) for k in rest], args.jobs, threads, report))
    rows = {k: row(k, o.metrics) for k, o in done.items() if o.metrics}
    failed = {k: o.error for k, o in done.items() if o.error}
    if not rows:
        print(f"error: every run failed; the first: {next(iter(failed.values()))}", file=sys.stderr)
        return 1
    about = {"command": "python -m piece_mm.experiments.policies " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:]),
             "tasks": args.tasks, "steps": args.steps, "batch_size": args.batch_size, "eval_limit": args.eval_limit,
             "score_examples": args.score_examples, "totals": totals, "lrs": lrs, "choose_at": choose_at,
             "seeds": seeds, "seeded": seeded, "sizes": sizes,
             "chosen_lr": {f"{m} {p} {t:g}": lr for (m, p, t), lr in chosen.items()},
             "failed": {str(k): e for k, e in failed.items()}}
    write(out, list(rows.values()), about, models, policies)
    print(f"wrote {out / 'policies.json'}, {out / 'table.md'} and the figures")
    return 1 if failed else 0


def nearest(t: float, among: list[float]) -> float | None:
    """The total of `among` nearest to t on a log scale (ties: the smaller); None when `among` is empty."""
    import math
    return min(among, key=lambda c: (abs(math.log(t / c)), c)) if among else None


def _floats(flag: str, text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not xs or any(not 0 < x <= 1 for x in xs):
        raise InputError(f"{flag} {text!r}: expected numbers in (0, 1]")
    return xs


def _ints(flag: str, text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not xs:
        raise InputError(f"{flag} {text!r}: expected at least one")
    return xs


def summarize(rows: list[dict], models, policies, totals, chosen: dict) -> list[dict]:
    """One line per (model, policy, total): its runs at the policy's chosen lr, over the seeds."""
    out = []
    for m in models:
        for p in policies:
            for t in totals:
                rs = [r for r in rows if (r["model"], r["policy"], r["total"], r["lr"]) ==
                      (m, p, t, chosen.get(f"{m} {p} {t:g}"))]
                if not rs:
                    continue

                def share(r, c):  # of the chosen weights over the run's tasks
                    return sum(s[c] for s in r["split"]) / max(1, sum(sum(s.values()) for s in r["split"]))
                out.append({"model": m, "policy": p, "total": t, "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs],
                            **{k: [r[k] for r in rs] for k in ("caption_retention", "VQA_retention", "OP", "BWT")},
                            "share": {c: statistics.mean(share(r, c) for r in rs) for c in COMPONENTS},
                            "overlap": statistics.mean(statistics.mean(r["overlap"]) for r in rs)})
    return out


def _sequence(tasks: str) -> str:
    return "the default sequence" if tasks == "world" else f"the sequence {tasks}"


def write(out: Path, rows: list[dict], about: dict, models, policies) -> None:
    totals = about["totals"]
    summary = summarize(rows, models, policies, totals, about["chosen_lr"])
    (out / "policies.json").write_text(json.dumps({**about, "summary": summary, "runs": rows}, indent=1) + "\n")
    lines = ["# Budget policies at equal total budgets", "", f"Command: `{about['command']}`", "",
             f"PIECE-F on {_sequence(about.get('tasks', 'world'))}, {about['steps']} steps of {about['batch_size']} "
             f"examples per task, {about['score_examples']} examples scored per task, eval-limit "
             f"{about['eval_limit']}; otherwise the default budget (keys and token embeddings left out, distillation "
             "on). The total is a fraction of every scorable weight, so each policy tunes the same number per task. "
             f"Mean ± sd over seeds {', '.join(map(str, about['seeds']))} at " +
             " and ".join(f"{t * 100:g} %" for t in about["seeded"]) +
             ", seed 0 elsewhere.", ""]
    for m in models:
        sz = about["sizes"][m]
        lines += [f"## {m}", "", "Scorable weights: " + ", ".join(f"{c} {sz[c]:,}" for c in COMPONENTS) +
                  f" (total {sum(sz.values()):,}).", "",
                  "### lr choice (seed 0)", "",
                  "| total | policy | lr | caption retention | VQA retention | OP | BWT | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in about["choose_at"]:
            for p in policies:
                for r in sorted((r for r in rows if (r["model"], r["policy"], r["total"], r["seed"]) == (m, p, c, 0)),
                                key=lambda r: r["lr"]):
                    mark = "✓" if about["chosen_lr"].get(f"{m} {p} {c:g}") == r["lr"] else ""
                    lines.append(f"| {c * 100:g} % | {p} | {r['lr']:g} | {r['caption_retention']:.3f} | "
                                 f"{r['VQA_retention']:.3f} | {r['OP']:.3f} | {r['BWT']:+.3f} | {mark} |")
        lines += ["", "### Each policy at its lr", "",
                  "| total | policy | lr | caption retention | VQA retention | OP | BWT | share vision / proj / llm "
                  "| overlap of successive masks |", "|---|---|---|---|---|---|---|---|---|"]
        for t in totals:
            for s in (s for s in summary if s["model"] == m and s["total"] == t):
                lines.append(f"| {t * 100:g} % | {s['policy']} | {s['lr']:g} | {_mean_sd(s['caption_retention'])} | "
                             f"{_mean_sd(s['VQA_retention'])} | {_mean_sd(s['OP'])} | {_mean_sd(s['BWT'])} | " +
                             " / ".join(f"{s['share'][c]:.2f}" for c in COMPONENTS) + f" | {s['overlap']:.3f} |")
        lines += ["", "### Where the global pool's budget goes (seed 0)", "",
                  "Share of each task's chosen weights per component, and per layer of the LLM and of the vision "
                  "encoder (layer index, then its share of all the task's chosen weights; \"other\": outside the "
                  "blocks, e.g. lm_head, norms, embeddings).", "",
                  "| total | task | vision | projector | llm | LLM layers | vision layers |",
                  "|---|---|---|---|---|---|---|"]
        for t in totals:
            g = [r for r in rows if (r["model"], r["policy"], r["total"], r["seed"]) == (m, "global", t, 0)]
            for r in g[:1]:
                for task, split, layers in zip(r["tasks"], r["split"], r["layers"]):
                    n = max(1, sum(split.values()))
                    lines.append(f"| {t * 100:g} % | {task} | " + " | ".join(f"{split[c] / n:.2f}" for c in COMPONENTS)
                                 + f" | {_layer_shares(layers['llm'], n)} | {_layer_shares(layers['vision'], n)} |")
        lines += ["", f"![retention against OP](retention_vs_op-{m}.png)", "",
                  f"![the global pool's component shares](shares-{m}.png)", "",
                  f"![overlap of successive masks](overlap-{m}.png)", ""]
        _figures(out, m, rows, summary, policies, totals)
    if about["failed"]:
        lines += ["## Runs that failed (left out; their logs are in their run directories)", ""]
        lines += [f"- {k}: {e}" for k, e in about["failed"].items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _layer_shares(layers: dict, n: int, most: int = 8) -> str:
    """"layer share" for the layers holding any of the task's n chosen weights, in layer order ("other": outside
    the blocks); only the `most` largest when there are more."""
    held = {k: v for k, v in layers.items() if v}
    if len(held) > most:
        held = dict(sorted(held.items(), key=lambda kv: -kv[1])[:most])
    order = sorted(held, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return ", ".join(f"{k} {held[k] / n:.2f}" for k in order) or "-"


def _figures(out: Path, m: str, rows, summary, policies, totals) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    for i, p in enumerate(policies):
        pts = [s for s in summary if s["model"] == m and s["policy"] == p]
        op = [statistics.mean(s["OP"]) for s in pts]
        sd = [statistics.stdev(s["OP"]) if len(s["OP"]) > 1 else 0.0 for s in pts]
        ret = [statistics.mean(s["caption_retention"]) for s in pts]
        line, = ax.plot(op, ret, lw=1)
        ax.scatter(op, ret, s=[20 + 120 * totals.index(s["total"]) for s in pts], color=line.get_color(), alpha=0.7,
                   label=p)
        shift = 1 + 0.03 * (i - (len(policies) - 1) / 2)  # side by side: the error bars do not hide each other
        bx.errorbar([s["total"] * 100 * shift for s in pts], op, yerr=sd, marker="o", capsize=3, label=p,
                    color=line.get_color())
    lo = min([statistics.mean(s["caption_retention"]) for s in summary if s["model"] == m] + [0.9])
    ax.set_ylim(lo - 0.05, 1.02)
    ax.margins(x=0.15)  # no point on the frame's edge
    ax.set_xlabel("OP (mean accuracy over the tasks after the last one)")
    ax.set_ylabel("caption retention (CIDEr after the last task / before)")
    sizes = (f"marker size: total budget, {min(totals) * 100:g} to {max(totals) * 100:g} %" if len(totals) > 1 else
             f"total budget {totals[0] * 100:g} %")
    ax.set_title(f"caption retention against OP\n({sizes})", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    bx.set_xscale("log")
    bx.set_xticks([t * 100 for t in totals], [f"{t * 100:g} %" for t in totals])
    bx.minorticks_off()
    bx.set_xlabel("total budget (of every scorable weight)")
    bx.set_ylabel("OP (bars: sd over seeds where there are three)")
    bx.set_title("OP against the total budget", fontsize=10)
    bx.legend(fontsize=8, loc="best")
    fig.suptitle(f"{m}: {len(policies)} ways to spend the same number of weights ({', '.join(policies)}), each at its "
                 "own lr")
    fig.tight_layout()
    fig.savefig(out / f"retention_vs_op-{m}.png", dpi=110)
    plt.close(fig)

    g = {t: next((r for r in rows if (r["model"], r["policy"], r["total"], r["seed"]) == (m, "global", t, 0)), None)
         for t in totals}
    g = {t: r for t, r in g.items() if r}
    if g:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        colors = {"vision": "tab:purple", "projector": "tab:orange", "llm": "tab:blue"}
        pos, lab, x = [], [], 0.0
        for t, r in g.items():  # one bar per task, a gap between totals
            for task, split in zip(r["tasks"], r["split"]):
                n, b = max(1, sum(split.values())), 0.0
                for c in COMPONENTS:
                    ax.bar(x, split[c] / n, bottom=b, color=colors[c], label=c if not pos else None)
                    b += split[c] / n
                pos.append(x)
                lab.append(f"{task}\n{t * 100:g} %")
                x += 1
            x += 0.5
        ax.set_xticks(pos, lab, fontsize=6)
        ax.set_ylabel("share of the task's chosen weights")
        ax.set_ylim(0, 1)
        ax.set_title(f"{m}: where the global pool spends its budget, task by task, at each total")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the bars fill the axes
        fig.tight_layout()
        fig.savefig(out / f"shares-{m}.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        pts = [s for s in summary if s["model"] == m and s["policy"] == p]
        ax.plot([s["total"] * 100 for s in pts], [s["overlap"] for s in pts], marker="o", label=p)
    ax.set_xscale("log")
    ax.set_xticks([t * 100 for t in totals], [f"{t * 100:g} %" for t in totals])
    ax.minorticks_off()
    ax.set_xlabel("total budget (of every scorable weight)")
    ax.set_ylabel("Jaccard overlap of successive tasks' masks (mean)")
    ax.set_title(f"{m}: how much each task's weights are the previous task's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"overlap-{m}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
