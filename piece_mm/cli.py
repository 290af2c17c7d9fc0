"""`piece-mm <command> ...`: the installed entry point. Each command is the module that `python -m` runs too, with
the same flags (`piece-mm train --help` = `python -m piece_mm.train --help`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command: (module, what it does)
    "train": ("piece_mm.train", "run a task sequence with one method (the main command)"),
    "plan": ("piece_mm.plan", "the memory a model needs, from its config.json alone"),
    "compare": ("piece_mm.experiments.compare", "every method on one sequence, side by side"),
    "sweep": ("piece_mm.experiments.sweep", "a budget x lr grid and its frontier"),
    "policies": ("piece_mm.experiments.policies", "five ways to spend one total budget over the components"),
    "frontier": ("piece_mm.experiments.frontier", "every method of earlier comparisons in one figure and table"),
    "zoo": ("piece_mm.zoo", "build the tiny embedded bases"),
    "probe": ("piece_mm.experiments.probe", "does a base's caption leak a task's answers, before any tuning"),
    "where": ("piece_mm.experiments.where", "which weights of a finished run changed the captions"),
    "captioning": ("piece_mm.experiments.captioning", "caption metrics of a model, against a baseline"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {c:<{width}}  {what}" for c, (_, what) in COMMANDS.items()]
    return "usage: piece-mm <command> [flags]   (piece-mm <command> --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"piece-mm: unknown command {command!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"piece-mm {command}"] + rest  # argparse names the command in its usage and errors
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
