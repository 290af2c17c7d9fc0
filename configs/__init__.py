"""The shipped configs, as data: budgets/, sequences/, models/, sweeps/, accelerate/, hf/ and vqacl_groups.yaml.

In this repository they sit at the top, beside piece_mm/; the installed distribution carries them as
piece_mm.configs (pyproject.toml). Code finds them through importlib.resources, wherever they are installed."""
from importlib.resources import files
from pathlib import Path

DIR = Path(str(files(__name__)))
