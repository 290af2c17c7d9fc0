"""The distribution a user installs: `pip wheel .`, installed into a fresh virtual environment, run from an empty
directory. The wheel carries tasks/, eval/ and experiments/ inside piece_mm, with configs/ and the tiny checkpoints as
data."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_an_empty_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                        str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("piece_mm-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    # The dependencies come from this interpreter's site-packages (a path on sys.path, whose .pth files, among them
    # the repository's editable install, are not run): piece_mm itself can only come from the wheel.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*args, timeout=900):
        return subprocess.run(list(args), cwd=empty, capture_output=True, text=True, timeout=timeout)
    r = run(str(py), "-c", "import piece_mm, piece_mm.tasks.world, piece_mm.eval.generate, piece_mm.configs as c; "
                          "print(piece_mm.__file__); print(sorted(p.name for p in c.DIR.iterdir()))")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(site) in r.stdout and all(f"'{d}'" in r.stdout for d in ("budgets", "sequences", "methods", "models"))
    for top in ("tasks", "eval", "experiments"):  # nothing installed at the top level but piece_mm
        r = run(str(py), "-c", f"import {top}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, top
    r = run(str(py), "-m", "piece_mm.train", "--model", "llava", "--max-steps", "2", "--eval-limit", "8",
            "--output", "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OP " in r.stdout and (empty / "run" / "metrics.json").is_file()
    r = run(str(env_dir / "bin" / "piece-mm"), "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "plan", "compare", "sweep", "zoo")), r.stdout
    r = run(str(env_dir / "bin" / "piece-mm"), "compare", "--methods", "nosuch")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nosuch" in r.stderr, r.stderr
    r = run(str(py), "-m", "piece_mm.train", "--model", "llava", "--tasks", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
