"""The foundation's acceptance run: the default sequence with SeqFT on both tiny models (about 4 minutes each)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["llava", "qwen2-vl"])
def test_seqft_learns_each_task_and_forgets_captioning(alias, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", alias, "--method", "seqft",
                        "--output", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    R, g = m["scores"], m["general"]
    assert g["before"]["CIDEr"] >= 1.0
    assert all(R[i + 1][i] >= 0.8 for i in range(len(m["tasks"]))), R
    assert g["after"][-1]["CIDEr"] <= 0.5 * g["before"]["CIDEr"], g
