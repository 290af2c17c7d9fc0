"""python -m piece_mm.train --model llava [--method piece-f] [--budget default] [--tasks world] [--output DIR] ...

Learns the tasks of a sequence one after another, evaluating every task and the general held-out set after each,
and writes <output>/metrics.json, report.md, score_matrix.png, cider.png and the final model (<output>/model).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    from piece_mm.continual import METHODS

    ap = argparse.ArgumentParser(prog="python -m piece_mm.train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava", help="alias (llava, qwen2-vl), local checkpoint dir or HF id")
    ap.add_argument("--method", default="piece-f", help=f"one of: {', '.join(sorted(METHODS))} (default: piece-f)")
    ap.add_argument("--budget", default="default",
                    help="budget YAML for the sparse methods, or a name in configs/budgets (default: default)")
    ap.add_argument("--tasks", default="world", help="sequence YAML, or a name in configs/sequences (default: world)")
    ap.add_argument("--output", type=Path, help="run directory (default: runs/<model>-<method>-<time>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, help="optimizer steps per task (default: the budget's steps for sparse "
                                               "methods, else the sequence's train.steps)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the budget's lr for sparse methods, else the "
                                             "sequence's train.lr)")
    ap.add_argument("--batch-size", type=int, help="training batch size (default: the sequence's train.batch_size)")
    ap.add_argument("--max-steps", type=int, help="cap on training steps per task, for quick runs")
    ap.add_argument("--eval-limit", type=int, help="cap on examples scored per task and captions per stage")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modeling code")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --output from its last checkpoint (same flags as the first call)")
    ap.add_argument("--clip-model", help="CLIPScore model: an open_clip architecture (with --clip-weights) or a "
                    "local open_clip dir (default: the tiny world CLIP when the general set is the world's)")
    ap.add_argument("--clip-weights", help="local weights file for --clip-model")
    ap.add_argument("--checkpoint-every", type=int, default=50,
                    help="also checkpoint every N steps inside a task (default: 50; 0 = only at task boundaries)")
    return ap.parse_args(argv)


def _check_positive(flag: str, value, kind=int):
    from tasks.errors import InputError
    if value is None:
        return
    if not isinstance(value, kind) or value <= 0:
        raise InputError(f"{flag}: {value!r}; expected a positive {kind.__name__}")


def _clip_scorer(args, seq):
    """The CLIPScore model: as given, else the tiny world CLIP for the world's captions, else none (a CLIP trained
    on the toy world says nothing about real photos)."""
    from eval.clipscore import WORLD_CLIP, load_clip

    if args.clip_model or args.clip_weights:
        return load_clip(args.clip_model, args.clip_weights, device=args.device)
    if seq.general_format == "world" and (WORLD_CLIP / "open_clip_config.json").is_file():
        return load_clip(device=args.device)
    from piece_mm import dist
    if seq.general_format != "world" and dist.is_main():
        print(f"note: no CLIPScore: the {seq.general_format} caption set needs --clip-model/--clip-weights",
              file=sys.stderr)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from piece_mm import checkpoint, dist
    from piece_mm.components import split_components
    from piece_mm.continual import METHODS, SPARSE_METHODS, check_resume, run, run_config
    from piece_mm.models import load_model
    from piece_mm.select import load_budget
    from tasks.errors import InputError
    from tasks.sequence import load_sequence

    t0 = time.time()
    try:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            raise InputError("accelerate config: FSDP / DeepSpeed shard the parameters, and this CLI's sparse tuning "
                             "needs whole ones; launch with configs/accelerate/ddp.yaml (see README)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            state = dist.init()  # the process group `accelerate launch` describes
            if args.device.startswith("cuda"):
                args.device = str(state.device)  # one GPU per process
        if args.method not in METHODS:
            raise InputError(f"--method {args.method!r}: unknown; known: {', '.join(sorted(METHODS))}")
        for flag, v in [("--steps", args.steps), ("--batch-size", args.batch_size), ("--max-steps", args.max_steps),
                        ("--eval-limit", args.eval_limit)]:
            _check_positive(flag, v)
        _check_positive("--lr", args.lr, float)
        seq = load_sequence(args.tasks, seed=args.seed)
        budget = load_budget(args.budget) if args.method in SPARSE_METHODS else None
        steps = args.steps or (budget or {}).get("steps") or int(seq.train.get("steps", 150))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        batch_size = args.batch_size or int(seq.train.get("batch_size", 16))
        if batch_size < dist.world():
            raise InputError(f"--batch-size {batch_size}: the global batch is split over {dist.world()} processes; "
                             f"expected at least {dist.world()}")
        lr = args.lr or (budget or {}).get("lr") or float(seq.train.get("lr", 1e-3))
        stem = Path(args.model).name if os.sep in args.model else args.model.replace("/", "_")
        output = args.output or Path("runs") / f"{stem}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.checkpoint_every < 0:
            raise InputError(f"--checkpoint-every: {args.checkpoint_every}; expected 0 or a positive int")
        if (output / "metrics.json").exists():
            if args.resume:
                print(f"{output}: the run has finished (metrics.json); nothing to resume")
                return 0
            raise InputError(f"--output {str(output)!r}: already holds a finished run (metrics.json); "
                             "choose another directory")
        if (output / "checkpoint.json").exists() and not args.resume:
            raise InputError(f"--output {str(output)!r}: holds an unfinished run (checkpoint.json); pass --resume "
                             "to continue it, or choose another directory")
        if args.resume and args.output is None:
            raise InputError("--resume: needs the --output of the run to continue")
        clip = _clip_scorer(args, seq)
        # A damaged checkpoint, or other flags than the run had, stop here: before anything is loaded or written.
        found = checkpoint.load(output) if args.resume else None
        if found is not None:
            check_resume(found[0], run_config(args.model, args.method, args.seed, steps, batch_size, lr,
                                              args.eval_limit, [t.name for t in seq.tasks], budget,
                                              clip.name if clip else None), output)
        torch.set_flush_denormal(True)  # denormals make CPU steps ~10x slower on tiny models
        torch.manual_seed(args.seed)
        model, processor = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
        # every parameter must have a component before anything is written (a model family the rules do not know)
        split_components(model, exclude=budget["exclude"] if budget else (), rules=(budget or {}).get("components"))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.barrier()  # every process has checked the output dir before the first one writes to it
    output.mkdir(parents=True, exist_ok=True)
    main_process = dist.is_main()
    via = f" (budget {budget['path']})" if budget else ""
    if main_process:
        print(f"{args.model} / {args.method}{via}: {len(seq.tasks)} tasks "
              f"({', '.join(t.name for t in seq.tasks)}), {steps} steps x batch {batch_size} at lr {lr:g}"
              + (f" over {dist.world()} processes" if dist.world() > 1 else "") + f" -> {output}", flush=True)
    try:
        metrics = run(model, processor, seq, model_name=args.model, method=args.method, output=output,
                      seed=args.seed, steps=steps, batch_size=batch_size, lr=lr, eval_limit=args.eval_limit,
                      budget=budget, log=lambda s: print(s, flush=True) if main_process else None,
                      checkpoint_every=args.checkpoint_every,
                      resume_from=found, clip=clip, spice=seq.corenlp or True)
    except InputError as e:  # a bad checkpoint or a resume with other flags: nothing is overwritten
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    model.save_pretrained(output / "model")
    processor.save_pretrained(output / "model")
    s = metrics["summary"]
    print(f"OP {s['OP']:.3f}  BWT {s['BWT']:+.3f}  FWT {s['FWT']:+.3f}  caption retention "
          f"{s['caption_retention']:.3f}  ({time.time() - t0:.0f} s)\nwrote {output / 'metrics.json'}, "
          f"{output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
