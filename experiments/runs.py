"""Many runs of the continual loop, `parallel` at a time, each in a process of its own.

A worker process builds the RunConfig, calls `piece_mm.train.execute` and writes the run directory as the CLI does
(metrics.json, report.md, the model), with its log in <output>/log.txt. A run that raises, or a process that dies
(killed, out of memory), is one failed Outcome with the reason; the other runs go on. A run that already finished
(metrics.json present) is read back, not rerun; one that stopped part-way (checkpoint.json) is resumed. Processes
are started with spawn: none inherits the parent's torch threads or RNG, so a run gives the numbers it gives alone."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable

FAILED = "failed.txt"  # <output>/failed.txt: the one-line reason a run failed (removed when it is run again)
LOG = "log.txt"


@dataclass
class Job:
    key: Hashable
    config: dict  # RunConfig fields; "output" is required


@dataclass
class Outcome:
    key: Hashable
    output: Path
    metrics: dict | None = None
    error: str | None = None  # one line: why the run failed
    bad_input: bool = False  # the run refused its input (an InputError), rather than crashing


def run_jobs(jobs: Iterable[Job], parallel: int = 1, threads: int | None = None,
             on_done: Callable[[Outcome], None] | None = None) -> dict:
    """{job.key: Outcome} for every job, run `parallel` at a time with `threads` torch threads each (default: the
    machine's cores shared out, or OMP_NUM_THREADS when it is set)."""
    if not threads and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"]) or None
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, parallel))
    ctx = multiprocessing.get_context("spawn")
    pending, running, done = list(jobs), {}, {}

    def finish(outcome: Outcome) -> None:
        done[outcome.key] = outcome
        if on_done is not None:
            on_done(outcome)

    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                out = Path(job.config["output"])
                config = launch_config(job)
                if config is None:
                    finish(Outcome(job.key, out, metrics=json.loads((out / "metrics.json").read_text())))
                    continue
                p = ctx.Process(target=_worker, args=(config, threads), name=f"run {job.key}")
                with _environment(OMP_NUM_THREADS=str(threads)):  # read by OpenMP as the child imports torch
                    p.start()
                running[p.sentinel] = (job, out, p)
            if not running:  # the last ones were read back: nothing to wait for
                continue
            for sentinel in multiprocessing.connection.wait(list(running)):
                job, out, p = running.pop(sentinel)
                p.join()
                finish(_outcome(job.key, out, p.exitcode))
    finally:
        for _, _, p in running.values():  # interrupted: the runs still going stop (they resume next time)
            p.terminate()
            p.join()
    return done


@contextlib.contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_config(job: Job) -> dict | None:
    """The RunConfig fields job's process starts with, its directory made ready: None for a finished run (read
    back), `resume` for one that stopped part-way (checkpoint.json), which piece_mm.train would refuse to start over."""
    out = Path(job.config["output"])
    if (out / "metrics.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED).unlink(missing_ok=True)
    return {**job.config, "output": str(out), "resume": (out / "checkpoint.json").is_file()}


def _outcome(key, out: Path, exitcode: int) -> Outcome:
    if exitcode == 0 and (out / "metrics.json").is_file():
        return Outcome(key, out, metrics=json.loads((out / "metrics.json").read_text()))
    if (out / FAILED).is_file():
        return Outcome(key, out, error=(out / FAILED).read_text().strip(), bad_input=exitcode == 2)
    how = f"killed by signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
    return Outcome(key, out, error=f"the run's process died ({how}); its log: {out / LOG}")


def _worker(config: dict, threads: int) -> None:
    """In the run's own process: its output to <output>/log.txt, then the run."""
    out = Path(config["output"])
    log = open(out / LOG, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import torch

    from piece_mm.errors import InputError
    from piece_mm.runconfig import RunConfig
    from piece_mm.train import execute
    torch.set_num_threads(threads)
    try:
        execute(RunConfig(**config))
    except InputError as e:
        _fail(out, f"error: {e}", 2)
    except BaseException as e:  # noqa: BLE001  any crash is this run's, reported; the study goes on
        import traceback
        traceback.print_exc()
        _fail(out, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (traceback in {out / LOG})", 1)


def _fail(out: Path, line: str, code: int) -> None:
    print(line, flush=True)
    (out / FAILED).write_text(line + "\n")
    sys.stdout.flush()
    os._exit(code)
