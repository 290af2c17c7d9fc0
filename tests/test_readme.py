"""Every code block of the README is run or checked against what it shows:
- bash: the two make targets; `make -n` shows that each creates .venv and runs the command the block names, and that
  command runs (the main job with --max-steps/--eval-limit added, so it ends in a minute; `make test` is what CI runs);
- python: executed as written, in a fresh directory;
- yaml: the sequence contract, parsed, its formats known to the loader;
- text: the --help output it quotes, equal to the CLI's own.
Every file the README names (links and `results/...`, `docs/...`, `configs/...` paths) exists."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _blocks(lang):
    return [code for kind, code in BLOCKS if kind == lang]


def test_every_block_has_a_kind_this_test_runs():
    assert BLOCKS and {kind for kind, _ in BLOCKS} <= {"bash", "python", "yaml", "text"}
    assert README.count("```") == 2 * len(BLOCKS)  # no block without a language tag escapes the checks


@pytest.mark.slow
def test_the_make_targets_set_up_a_venv_and_run_the_commands_shown(tmp_path):
    (block,) = _blocks("bash")
    shown = dict(re.findall(r"make (\w+)\s+# .*?then: (.+)", block))
    assert set(shown) == {"run", "test"}
    for target, command in shown.items():
        r = subprocess.run(["make", "-n", "-B", target, "VENV=" + str(tmp_path / "venv")], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"-m venv {tmp_path / 'venv'}" in r.stdout
        for step in command.split(" && "):  # each command the comment names, in the target's recipe
            assert f"{tmp_path / 'venv'}/bin/{step.strip()}" in r.stdout, (step, r.stdout)
    main = shown["run"].split()
    r = subprocess.run([sys.executable, *main[1:], "--max-steps", "1", "--eval-limit", "2", "--output",
                        str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "caption retention" in r.stdout and (tmp_path / "run" / "report.md").is_file()


@pytest.mark.slow
def test_the_python_block_runs_as_written(tmp_path):
    (code,) = _blocks("python")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "size-delta.safetensors"), "pt") as f:
        assert list(f.keys())  # the delta of the tuned weights was written


def test_the_yaml_block_is_the_loaders_contract():
    from piece_mm.tasks.sequence import FORMATS, GENERAL_FORMATS  # what the loader knows
    (text,) = _blocks("yaml")
    seq = yaml.safe_load(text)
    assert {t["format"] for t in seq["tasks"]} <= set(FORMATS)
    assert seq["general"]["format"] in GENERAL_FORMATS


def test_the_help_block_is_the_clis_help():
    (text,) = _blocks("text")
    r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "100"}, cwd=ROOT)
    assert r.returncode == 0
    assert text.strip() == r.stdout.strip()


@pytest.mark.parametrize("path", sorted(set(re.findall(r"\]\(([^)#\s]+)", README)) |
                                        set(re.findall(r"`((?:results|docs|configs|examples|benchmarks)/[^`\s*<]+)`",
                                                       README))))
def test_every_file_the_readme_names_exists(path):
    assert (ROOT / path).exists(), path
