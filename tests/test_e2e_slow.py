"""The foundation's acceptance run: the default sequence with SeqFT on both tiny models (about 4 minutes each,
side by side)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_seqft_learns_each_task_and_forgets_captioning(tmp_path):
    """Both models side by side, one thread each (the two cores of CI), with the run's own defaults."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {alias: subprocess.Popen([sys.executable, "-m", "piece_mm.train", "--model", alias, "--method", "seqft",
                                      "--output", str(tmp_path / alias)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
             for alias in ("llava", "qwen2-vl")}
    for alias, proc in procs.items():
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-3000:]
        m = json.loads((tmp_path / alias / "metrics.json").read_text())
        R, g = m["scores"], m["general"]
        assert g["before"]["CIDEr"] >= 1.0, alias
        assert all(R[i + 1][i] >= 0.8 for i in range(len(m["tasks"]))), (alias, R)
        assert g["after"][-1]["CIDEr"] <= 0.5 * g["before"]["CIDEr"], (alias, g)
