"""python -m piece_mm.train --model llava [--method piece-f] [--budget default] [--tasks world] [--output DIR] ...

Learns the tasks of a sequence one after another, evaluating every task and the general held-out set after each,
and writes <output>/metrics.json, report.md, score_matrix.png, cider.png and the final model (<output>/model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from piece_mm.configs import DIR as CONFIGS

RUN_ARGS = "run_args.json"  # the flags a run was started with and where: `--resume DIR` reads them back


def _names(kind: str) -> str:
    root = CONFIGS / kind
    return ", ".join(sorted(p.stem for p in root.glob("*.yaml"))) or "none found"


def build_parser() -> argparse.ArgumentParser:
    from piece_mm.continual import METHODS
    from piece_mm.models import ALIASES

    ap = argparse.ArgumentParser(prog="python -m piece_mm.train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava",
                    help=f"an alias ({', '.join(ALIASES)}), a local checkpoint dir, or a cached HF id (default: llava)")
    ap.add_argument("--method", default="piece-f", help=f"one of: {', '.join(sorted(METHODS))} (default: piece-f)")
    ap.add_argument("--budget",
                    help=f"budget YAML for the sparse methods, or a name in configs/budgets: {_names('budgets')} "
                         "(default: the sequence's train.budget, else default)")
    ap.add_argument("--tasks", default="world",
                    help=f"sequence YAML, or a name in configs/sequences: {_names('sequences')} (default: world)")
    ap.add_argument("--output", type=Path, help="run directory (default: runs/<model>-<method>-<time>)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the task data, the scoring batches and the training order (default: 0)")
    ap.add_argument("--device", default="auto",
                    help="torch device to train on: auto (cuda when there is one, else cpu), cpu, cuda, cuda:N "
                         "(default: auto)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                    help="weights' dtype: auto = the checkpoint's own (default: bfloat16 on CUDA, float32 on CPU); "
                         "every method keeps float32 master copies of the weights it tunes either way")
    ap.add_argument("--data-root", help="the directory a recipe's paths are relative to (configs/sequences with "
                                        "'paths: data-root', e.g. paper-vqav2; docs/paper.md); default: "
                                        "$PIECE_MM_DATA_ROOT")
    ap.add_argument("--steps", type=int, help="optimizer steps per task (default: from --epochs or the sequence's "
                                               "train.epochs, else the budget's steps for sparse methods, else the "
                                               "sequence's train.steps)")
    ap.add_argument("--epochs", type=float, help="passes over each task's training examples: its steps are "
                                                 "ceil(examples x epochs / batch size), the batch size being the "
                                                 "effective one (--grad-accum splits it) (default: the sequence's "
                                                 "train.epochs)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the budget's lr for sparse methods, else the "
                                             "sequence's train.lr)")
    ap.add_argument("--batch-size", type=int, help="effective training batch size: the examples of one optimizer "
                                                    "step, over every process and micro-batch (default: the "
                                                    "sequence's train.batch_size)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step: each step's batch is split into N, with the same examples "
                         "and (up to rounding) the same gradient, in about 1/N of the activation memory (default: 1)")
    ap.add_argument("--max-length", type=int,
                    help="longest training sequence in tokens, image tokens included: a longer example is left out "
                         "(and counted in the log), never cut (default: no limit)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations during backward instead of keeping them (transformers' gradient "
                         "checkpointing): less memory, about a third more time")
    ap.add_argument("--max-steps", type=int, help="cap on training steps per task, for quick runs")
    ap.add_argument("--eval-limit", type=int, help="cap on examples scored per task and captions per stage")
    ap.add_argument("--eval-general", choices=("every", "last"), default="every",
                    help="score the general set (captions, general VQA) after every task, or only after the last: "
                         "every retention is read there, and a sweep's runs take about a fifth less time (default: "
                         "every)")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modeling code")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                    help="continue an interrupted run from its last checkpoint: --resume DIR takes the run's own "
                         "flags from DIR/run_args.json (from any working directory); --resume alone continues "
                         "--output with the flags given")
    ap.add_argument("--clip-model", help="CLIPScore model: an open_clip architecture (with --clip-weights) or a "
                    "local open_clip dir (default: the tiny world CLIP when the general set is the world's)")
    ap.add_argument("--clip-weights", help="local weights file for --clip-model")
    ap.add_argument("--corenlp", help="dir holding the Stanford CoreNLP 3.6.0 jars, for SPICE (default: the "
                                      "sequence's general.corenlp, else $PIECE_MM_CORENLP; without them SPICE is "
                                      "skipped with one warning)")
    ap.add_argument("--caption-prompt", help="the prompt that asks for a caption of the general set (default: the "
                                             "sequence's general.caption_prompt, else \"describe the image\")")
    ap.add_argument("--caption-max-new-tokens", type=int,
                    help="new-token limit of a caption (default: general.caption_max_new_tokens, else 24)")
    ap.add_argument("--answer-max-new-tokens", type=int,
                    help="new-token limit of a task or VQA answer (default: general.answer_max_new_tokens, else 8)")
    ap.add_argument("--allow-unknown-tokens", action="store_true",
                    help="train even when a task answer or a reference caption has a word the tokenizer maps to its "
                         "unknown token (by default that stops the run before training)")
    ap.add_argument("--retention-threshold", type=float, default=0.90,
                    help="caption retention at or above which report.md says general ability was kept "
                         "(default: 0.90)")
    ap.add_argument("--checkpoint-every", type=int, default=50,
                    help="also checkpoint every N steps inside a task (default: 50; 0 = only at task boundaries)")
    ap.add_argument("--method-config", help="a YAML of the method's constants, replacing configs/methods/<method>.yaml "
                    "(EWC's lambda, LoRA's rank, ...): " + _names("methods"))
    ap.add_argument("--exclude", help="weights a dense or LoRA method leaves frozen: comma-separated regexes of "
                    "parameter names (re.search), or 'budget' for the budget's exclude list (the default budget's: "
                    "token embeddings and the LLM's attention keys), as the sparse methods leave them out "
                    "(default: none; a sparse method takes its exclusions from its budget)")
    return ap


def parse_args(argv=None):
    """The flags. `--resume DIR` fills every flag not given on this call from DIR/run_args.json, and sets `cwd` to
    the directory the run was started in, where its relative paths (model, tasks, budget) mean what they meant."""
    from piece_mm.errors import InputError

    ap = build_parser()
    args = ap.parse_args(argv)
    args.cwd = None
    if isinstance(args.resume, str):
        run_dir = Path(args.resume).resolve()
        saved_file = run_dir / RUN_ARGS
        if not saved_file.is_file():
            raise InputError(f"--resume {args.resume!r}: no {RUN_ARGS} there (not a run directory of "
                             "piece_mm.train); for a run started by an older version, give its flags with "
                             "--output DIR --resume")
        try:
            saved = json.loads(saved_file.read_text())
            flags, cwd = saved["flags"], saved["cwd"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{saved_file}: not a run's flags ({type(e).__name__}: {e})") from None
        if not Path(cwd).is_dir():
            raise InputError(f"{saved_file}: cwd {cwd!r}: the directory the run was started in is gone; give its "
                             "flags with --output DIR --resume")
        defaults = vars(ap.parse_args([]))
        for key, value in flags.items():  # a flag given on this call wins over the saved one
            if key in defaults and getattr(args, key) == defaults[key]:
                setattr(args, key, value)
        args.output, args.resume, args.cwd = run_dir, True, cwd
    return args


def saved_args(args) -> dict:
    """What `--resume DIR` needs: the flags as given, and the directory they were given in."""
    flags = {k: v for k, v in vars(args).items() if k not in ("resume", "output", "cwd")}
    return {"flags": flags, "cwd": os.getcwd()}


def resume_command(output: Path) -> str:
    import shlex
    return f"python -m piece_mm.train --resume {shlex.quote(str(Path(output).resolve()))}"


def resolve_device(name: str) -> str:
    """The device to train on, checked before anything loads: auto -> cuda if there is one, else cpu."""
    import torch

    from piece_mm.errors import InputError
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r}: not a torch device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"--device {name!r}: this machine has no CUDA device; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"--device {name!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"--device {name!r}: MPS is not available here; use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise InputError(f"--device {name!r}: unsupported device type {dev.type!r}; expected cpu, cuda or mps")
    return name


def resolve_dtype(name: str | None, device: str):
    """torch dtype (or "auto") to load the weights in: bfloat16 on CUDA, float32 elsewhere, unless asked."""
    import torch
    if name is None:
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return name if name == "auto" else getattr(torch, name)


def check_vocabulary(tokenizer, seq, model_name: str) -> None:
    """A task answer or reference caption word that the tokenizer cannot represent would be trained and scored as
    <unk>: the run would "succeed" with nothing learned. Stop with the file, the example and the word."""
    from piece_mm.batching import first_unknown_word
    from piece_mm.errors import InputError
    where = [(f"task {t.name!r} {split} example", [ex.answer for ex in getattr(t, split)])
             for t in seq.tasks for split in ("train", "test")]
    where.append(("general caption set, example", [" ".join(ex.refs) for ex in seq.captions]))
    for what, texts in where:
        hit = first_unknown_word(tokenizer, texts)
        if hit is not None:
            i, word = hit
            raise InputError(f"{seq.path}: {what} {i}: word {word!r} is unknown to the tokenizer of --model "
                             f"{model_name!r} (it becomes {tokenizer.unk_token!r}); use a model that knows it, or "
                             "pass --allow-unknown-tokens")


def frozen_patterns(cfg, budget_name: str) -> list[str]:
    """The regexes of --exclude: a dense or LoRA method's weights that stay frozen ('budget': the budget's exclude
    list). A sparse method's exclusions are its budget's, so --exclude is refused for it."""
    import re

    from piece_mm.errors import InputError
    from piece_mm.methods import METHODS
    from piece_mm.select import load_budget
    if not cfg.exclude:
        return []
    if METHODS[cfg.method].sparse:
        raise InputError(f"--exclude {cfg.exclude!r}: method {cfg.method!r} chooses its weights within the budget, "
                         f"whose 'exclude' field says what it leaves out; --exclude is for dense and LoRA methods")
    if cfg.exclude.strip() == "budget":
        return list(load_budget(budget_name)["exclude"])
    patterns = [x.strip() for x in cfg.exclude.split(",") if x.strip()]
    for x in patterns:
        try:
            re.compile(x)
        except re.error as e:
            raise InputError(f"--exclude: {x!r} is not a regular expression ({e})") from None
    if not patterns:
        raise InputError(f"--exclude {cfg.exclude!r}: expected 'budget' or comma-separated regexes")
    return patterns


def _clip_scorer(cfg, seq, device: str):
    """The CLIPScore model: as given, else the tiny world CLIP for the world's captions, else none (a CLIP trained
    on the toy world says nothing about real photos)."""
    from piece_mm.eval.clipscore import WORLD_CLIP, load_clip

    if cfg.clip_model or cfg.clip_weights:
        return load_clip(cfg.clip_model, cfg.clip_weights, device=device)
    if seq.general_format == "world" and (WORLD_CLIP / "open_clip_config.json").is_file():
        return load_clip(device=device)
    from piece_mm import dist
    if seq.general_format != "world" and dist.is_main():
        print(f"note: no CLIPScore: the {seq.general_format} caption set needs --clip-model/--clip-weights",
              file=sys.stderr)
    return None


def main(argv=None) -> int:
    """Exit 0 when the run finished, 2 on bad input (one line), 130 on Ctrl-C (one line with the resume command)."""
    state = {"output": None}
    try:
        return _main(argv, state)
    except KeyboardInterrupt:
        out = state["output"]
        if out is None or not Path(out).is_dir():
            print("interrupted: nothing was written", file=sys.stderr)
        else:
            from piece_mm import checkpoint
            found = (Path(out) / checkpoint.POINTER).is_file()
            what = "its last checkpoint is kept" if found else "no checkpoint yet (resuming starts it over)"
            print(f"interrupted: {out}: {what}; continue with: {resume_command(out)}", file=sys.stderr)
        return 130


def _main(argv, state: dict) -> int:
    from piece_mm.errors import InputError
    from piece_mm.runconfig import RunConfig
    here = os.getcwd()
    try:
        args = parse_args(argv)
        cfg = RunConfig.from_flags(args)
        if args.cwd is not None:
            os.chdir(args.cwd)  # the run's relative paths are relative to where it was started
        execute(cfg, state, saved=saved_args(args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        os.chdir(here)
    return 0


def execute(cfg, state: dict | None = None, saved: dict | None = None) -> dict | None:
    """One run of the continual loop, as `cfg` (a RunConfig) says: what `python -m piece_mm.train` does, for callers
    in Python (experiments/). Returns the metrics (None on the other processes of a multi-process run, and the
    metrics.json already there when a finished run is resumed). Bad input raises InputError before anything is
    written. `state["output"]` is set once the run directory exists; `saved` is what run_args.json records (default:
    cfg's fields and the working directory)."""
    import torch
    import transformers

    if not sys.stderr.isatty():  # progress bars only on a terminal; a log or a pipe gets the log lines
        transformers.utils.logging.disable_progress_bar()

    from piece_mm import checkpoint, dist, shard
    from piece_mm.components import split_components
    from piece_mm.continual import check_resume, run, run_config
    from piece_mm.errors import InputError, from_data
    from piece_mm.methods import METHODS, load_settings
    from piece_mm.models import ALIASES, load_model, resolve
    from piece_mm.select import load_budget
    from piece_mm.tasks.sequence import load_sequence, with_generation

    state = {} if state is None else state
    device = resolve_device(cfg.device)  # before anything loads: a device that is not there is one line
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model not in ALIASES:
        resolve(cfg.model)  # an unknown dir or an uncached HF id: one line now, before the data and CLIP load
    sharding = shard.requested()
    if sharding in ("fsdp1", "deepspeed"):
        raise InputError(f"accelerate config: {'FSDP1' if sharding == 'fsdp1' else 'DeepSpeed'} is not supported "
                         "by sparse tuning; launch with configs/accelerate/fsdp2.yaml (FSDP2) or ddp.yaml")
    if sharding == "fsdp2" and not METHODS[cfg.method].sharded:
        raise InputError(f"--method {cfg.method!r}: not supported on FSDP2 shards; supported: "
                         f"{', '.join(n for n, m in METHODS.items() if m.sharded)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        group = dist.init()  # the process group `accelerate launch` describes
        if device.startswith("cuda"):
            device = str(group.device)  # one GPU per process
    with from_data():  # tasks/ says what is wrong with a file as a ValueError
        seq = with_generation(load_sequence(cfg.tasks, seed=cfg.seed, data_root=cfg.data_root),
                              caption_prompt=cfg.caption_prompt,
                              caption_max_new_tokens=cfg.caption_max_new_tokens,
                              answer_max_new_tokens=cfg.answer_max_new_tokens)
    budget_name = cfg.budget or seq.train.get("budget", "default")  # a recipe names its own (paper-vqav2.yaml)
    budget = load_budget(budget_name) if METHODS[cfg.method].sparse else None
    settings = load_settings(cfg.method, cfg.method_config)
    frozen = frozen_patterns(cfg, budget_name)
    if sharding == "fsdp2" and budget and budget["keep_earlier"]:
        raise InputError(f"{budget['path']}: keep_earlier reads the earlier tasks' whole masks into the scores, which "
                         "are shards on FSDP2; use it on one process or DDP")
    if sharding == "fsdp2" and budget["score_batch_size"] == 1:
        raise InputError(f"{budget['path']}: score_batch_size is 1 (per-sample scoring), which needs whole "
                         "parameters; on FSDP2 shards use 2 or more")
    batch_size = cfg.batch_size or int(seq.train.get("batch_size", 16))
    epochs = None if cfg.steps else (cfg.epochs or seq.train.get("epochs"))
    if epochs:  # the recipe's way: passes over each task's examples at the effective batch
        steps = [max(1, math.ceil(len(t.train) * epochs / batch_size)) for t in seq.tasks]
        if cfg.max_steps:
            steps = [min(n, cfg.max_steps) for n in steps]
        if len(set(steps)) == 1:
            steps = steps[0]
    else:
        steps = cfg.steps or (budget or {}).get("steps") or int(seq.train.get("steps", 150))
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
    warmup = float(seq.train.get("warmup", 0.1))
    if batch_size < dist.world() * cfg.grad_accum:
        raise InputError(f"--batch-size {batch_size}: split into --grad-accum {cfg.grad_accum} micro-batches on "
                         f"{dist.world()} process(es); expected at least {dist.world() * cfg.grad_accum}")
    if batch_size < dist.world():
        raise InputError(f"--batch-size {batch_size}: the global batch is split over {dist.world()} processes; "
                         f"expected at least {dist.world()}")
    lr = cfg.lr or (budget or {}).get("lr") or float(seq.train.get("lr", 1e-3))
    stem = Path(cfg.model).name if os.sep in cfg.model else cfg.model.replace("/", "_")
    output = cfg.output or Path("runs") / f"{stem}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (output / "metrics.json").exists():
        if cfg.resume:
            print(f"{output}: the run has finished (metrics.json); nothing to resume")
            return json.loads((output / "metrics.json").read_text())
        raise InputError(f"--output {str(output)!r}: already holds a finished run (metrics.json); "
                         "choose another directory")
    if (output / "checkpoint.json").exists() and not cfg.resume:
        raise InputError(f"--output {str(output)!r}: holds an unfinished run (checkpoint.json); pass --resume "
                         "to continue it, or choose another directory")
    if cfg.resume and cfg.output is None:
        raise InputError("--resume: needs the --output of the run to continue")
    clip = _clip_scorer(cfg, seq, device)
    # A damaged checkpoint, or other flags than the run had, stop here: before anything is loaded or written.
    found = checkpoint.load(output) if cfg.resume else None
    if found is not None:
        now = run_config(cfg.model, cfg.method, cfg.seed, steps, batch_size, lr, cfg.eval_limit,
                         [t.name for t in seq.tasks], budget, clip.name if clip else None, warmup=warmup)
        check_resume(found[0], now | ({"settings": settings} if settings else {}) | {"frozen": frozen}, output)
    torch.set_flush_denormal(True)  # denormals make CPU steps ~10x slower on tiny models
    torch.manual_seed(cfg.seed)
    model, processor = load_model(cfg.model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if not cfg.allow_unknown_tokens:
        check_vocabulary(processor.tokenizer, seq, cfg.model)
    # every parameter must have a component before anything is written (a model family the rules do not know)
    split_components(model, exclude=budget["exclude"] if budget else (), rules=(budget or {}).get("components"))
    if sharding == "fsdp2":
        if dist.world() < 2:
            raise InputError("accelerate config: FSDP2 over 1 process; launch 2 or more (--num_processes)")
        shard.shard_model(model)
    dist.barrier()  # every process has checked the output dir before the first one writes to it
    output.mkdir(parents=True, exist_ok=True)
    state["output"] = output.resolve()
    main_process = dist.is_main()
    if main_process and not (output / RUN_ARGS).is_file():  # `--resume DIR` reads them back, from anywhere
        record = saved or {"flags": {k: v for k, v in cfg.flags().items() if k not in ("resume", "output")},
                           "cwd": os.getcwd()}
        (output / RUN_ARGS).write_text(json.dumps(record, indent=1))
    via = f" (budget {budget['path']})" if budget else ""
    if main_process:
        each = f"{steps} steps" if isinstance(steps, int) else f"{'/'.join(map(str, steps))} steps"
        print(f"{cfg.model} / {cfg.method}{via}: {len(seq.tasks)} tasks "
              f"({', '.join(t.name for t in seq.tasks)}), {each} x batch {batch_size} at lr {lr:g}"
              + (f" over {dist.world()} processes" if dist.world() > 1 else "") + f" -> {output}", flush=True)
        if epochs:
            sizes = sorted({len(t.train) for t in seq.tasks})
            print(f"  {epochs:g} epochs of {'/'.join(map(str, sizes))} examples per task at effective batch "
                  f"{batch_size} ({batch_size // (cfg.grad_accum * dist.world())} per micro-batch x {cfg.grad_accum} "
                  f"accumulated x {dist.world()} process(es)); lr schedule cosine, warmup {warmup:g} of the steps",
                  flush=True)
    # a bad checkpoint or a resume with other flags raises InputError here: nothing is overwritten
    metrics = run(model, processor, seq, model_name=cfg.model, method=cfg.method, output=output,
                  seed=cfg.seed, steps=steps, batch_size=batch_size, lr=lr, eval_limit=cfg.eval_limit,
                  budget=budget, log=lambda s: print(s, flush=True) if main_process else None,
                  checkpoint_every=cfg.checkpoint_every, warmup=warmup,
                  resume_from=found, clip=clip, spice=cfg.corenlp or seq.corenlp or True,
                  retention_threshold=cfg.retention_threshold, grad_accum=cfg.grad_accum,
                  max_length=cfg.max_length, gradient_checkpointing=cfg.gradient_checkpointing, settings=settings,
                  frozen=frozen, eval_general=cfg.eval_general)
    whole = shard.full_state_dict(model)  # on shards a collective: every rank sends its part
    if not main_process:
        return None
    model.save_pretrained(output / "model", state_dict=whole)
    processor.save_pretrained(output / "model")
    s = metrics["summary"]
    print(f"OP {s['OP']:.3f}  BWT {s['BWT']:+.3f}  FWT {s['FWT']:+.3f}  {retention_line(s)}  (run time "
          f"{metrics['time_s']:.0f} s, as in report.md)\n"
          f"wrote {output / 'metrics.json'}, {output / 'report.md'}")
    return metrics


def retention_line(s: dict) -> str:
    """'caption retention 1.000 (unseen prompts 0.950)  VQA retention 0.98 (unseen phrasings 0.97)', with what the
    summary holds."""
    line = f"caption retention {s['caption_retention']:.3f}"
    if "caption_retention_unseen" in s:
        line += f" (unseen prompts {s['caption_retention_unseen']:.3f})"
    if "vqa_retention" in s:
        line += f"  VQA retention {s['vqa_retention']:.3f}"
        if "vqa_retention_unseen" in s:
            line += f" (unseen phrasings {s['vqa_retention_unseen']:.3f})"
    return line


if __name__ == "__main__":
    sys.exit(main())
