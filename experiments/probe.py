"""python -m piece_mm.experiments.probe --model llava [--tasks world] [--limit 100] [--output probe.json]

The prompt-conditioning probe (piece_mm.eval.probe) on a model loaded from an alias, a local dir or a cached HF id:
before any tuning, does the prompt decide what the model says?"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from piece_mm.errors import InputError, from_data
    from piece_mm.eval.probe import format_table, probe
    from piece_mm.models import load_model
    from piece_mm.tasks.sequence import load_sequence

    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="alias (llava, qwen2-vl), HF id or local checkpoint dir")
    ap.add_argument("--tasks", default="world", help="sequence YAML or a name in configs/sequences (default: world)")
    ap.add_argument("--limit", type=int, default=100, help="held-out caption images asked (and test examples per task)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path, help="also write the record as JSON here")
    args = ap.parse_args(argv)
    try:
        if args.limit < 1:
            raise InputError(f"--limit: {args.limit}; expected a positive integer")
        with from_data():
            seq = load_sequence(args.tasks)
        model, processor = load_model(args.model, device=args.device)
        record = {"model": args.model, "sequence": args.tasks,
                  **probe(model, processor, seq.captions[: args.limit], seq.tasks)}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(record))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
