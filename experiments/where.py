"""Where does a task's damage to the captions live? Split one task's sparse delta by layer and by weight kind.

    python -m piece_mm.experiments.where --run runs/llava-piece-f-... --task 1   # the first task of a finished run
    python -m piece_mm.experiments.where --run DIR --task 3 --limit 100 --output where.json
    python -m piece_mm.experiments.where --run DIR --stages   # which task made the damage, and what it is

A finished sparse run keeps each task's delta (deltas/<i>-<task>.safetensors: the chosen elements and their values).
On the held-out caption images of the run's sequence, this applies the deltas of the tasks before `--task`, then,
for every group of the task's delta (each LLM layer, each kind of weight: q_proj, k_proj, ..., lm_head), captions the
images with only that group applied and with everything but that group. It counts the captions that differ from
the reference (exact match) and the words they gain. A group whose delta alone makes the damage, and without which
the damage is gone, is where it lives. With --stages it applies the deltas one task after another instead and, after
each, counts the captions that differ from the reference and the words they gain: which task made the damage, and
whether it adds up. Nothing is trained; the run's model is rebuilt from its base and deltas."""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "norm",
         "lm_head")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def groups(names) -> dict[str, list[str]]:
    """{"layer 0": [...], ..., "k_proj": [...], ...}: each name in one layer group and one kind group."""
    out = collections.defaultdict(list)
    for n in names:
        m = _LAYER.search(n)
        out[f"layer {m.group(1)}" if m else "outside the layers"].append(n)
        out[next((k for k in KINDS if k in n), "other")].append(n)
    return dict(sorted(out.items(), key=lambda kv: (not kv[0].startswith("layer"), kv[0])))


def captions_changed(model, processor, captions, batch_size: int = 64) -> dict:
    from piece_mm.eval.generate import generate
    preds = generate(model, processor, captions, batch_size=batch_size, max_new_tokens=24)
    gained = collections.Counter()
    wrong = 0
    for p, ex in zip(preds, captions):
        if p != ex.answer:
            wrong += 1
            gained.update(set(p.split()) - set(ex.answer.split()))
    return {"wrong": wrong, "gained": dict(gained.most_common(5))}


def _rebuild(run: Path, limit: int):
    """(the run's base model, its processor, the first `limit` held-out captions of its sequence, its task deltas'
    files in task order)."""
    from piece_mm.errors import InputError, from_data
    from piece_mm.models import load_model
    from piece_mm.tasks.sequence import load_sequence

    args = json.loads((run / "run_args.json").read_text())
    flags = args["flags"]
    files = sorted((run / "deltas").glob("*.safetensors"), key=lambda f: int(f.name.split("-")[0]))
    if not files:
        raise InputError(f"--run {run}: no deltas/ (a finished run of a sparse method keeps them)")
    model, processor = load_model(flags["model"])
    tasks = Path(args.get("cwd", ".")) / flags["tasks"]  # a sequence YAML named relative to where the run started
    with from_data():
        seq = load_sequence(str(tasks) if tasks.is_file() else flags["tasks"], seed=flags.get("seed", 0))
    return model, processor, seq.captions[:limit], files


def stages(run: Path, limit: int = 100) -> dict:
    """The captions after each task of the run, its deltas applied one after another: {"run", "captions",
    "before": captions_changed of the base, "stages": [{"task", **captions_changed}, ...] in task order}."""
    from piece_mm.delta import apply_delta, load_delta

    model, processor, captions, files = _rebuild(run, limit)
    rows = [{"task": "before", **captions_changed(model, processor, captions)}]
    for f in files:
        apply_delta(model, load_delta(f))
        rows.append({"task": f.stem, **captions_changed(model, processor, captions)})
    return {"run": str(run), "captions": len(captions), "before": rows[0], "stages": rows[1:]}


def where(run: Path, task: int, limit: int = 100) -> dict:
    import torch

    from piece_mm.delta import apply_delta, load_delta
    from piece_mm.errors import InputError

    n = len(list((run / "deltas").glob("*.safetensors")))
    if n and not 1 <= task <= n:
        raise InputError(f"--task {task}: the run has {n} task deltas; expected 1..{n}")
    model, processor, captions, files = _rebuild(run, limit)
    for f in files[:task - 1]:
        apply_delta(model, load_delta(f))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = load_delta(files[task - 1])

    def with_only(names) -> dict:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        apply_delta(model, {n: delta[n] for n in names})
        return captions_changed(model, processor, captions)

    rows = {}
    for g, names in groups(delta).items():
        rows[g] = {"weights": sum(delta[n][0].numel() for n in names), "only": with_only(names),
                   "without": with_only([n for n in delta if n not in names])}
    return {"run": str(run), "task": files[task - 1].stem, "captions": len(captions),
            "before": with_only([]), "after": with_only(list(delta)), "groups": rows}


def format_stages(rec: dict) -> str:
    lines = [f"{rec['run']}: {rec['captions']} held-out captions, the deltas applied one task after another", "",
             f"{'after':<16} {'wrong':>6}  words gained"]
    for r in [rec["before"], *rec["stages"]]:
        lines.append(f"{r['task']:<16} {r['wrong']:>6}  {r['gained']}")
    return "\n".join(lines)


def format_table(rec: dict) -> str:
    lines = [f"{rec['run']}: task {rec['task']}, {rec['captions']} held-out captions; wrong (exact match) before the "
             f"task {rec['before']['wrong']}, after it {rec['after']['wrong']} {rec['after']['gained']}", "",
             f"{'group':<20} {'weights':>8} {'only it':>8} {'all but it':>11}  words gained with it alone"]
    for g, r in rec["groups"].items():
        lines.append(f"{g:<20} {r['weights']:>8,} {r['only']['wrong']:>8} {r['without']['wrong']:>11}  "
                     f"{r['only']['gained']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from piece_mm.errors import InputError

    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.where", description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run dir of a sparse method (with deltas/)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", type=int, help="which task's delta, 1-based")
    what.add_argument("--stages", action="store_true", help="the captions after each task, deltas applied in order")
    ap.add_argument("--limit", type=int, default=100, help="held-out caption images (default 100)")
    ap.add_argument("--output", type=Path, help="also write the record as JSON here")
    args = ap.parse_args(argv)
    try:
        if not (args.run / "run_args.json").is_file():
            raise InputError(f"--run {args.run}: no run_args.json (not a run dir of piece_mm.train)")
        if args.limit < 1:
            raise InputError(f"--limit: {args.limit}; expected a positive integer")
        rec = stages(args.run, args.limit) if args.stages else where(args.run, args.task, args.limit)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stages(rec) if args.stages else format_table(rec))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
