import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(tmp_path):
    """A smoke run on the toy preset: the schema, and per-sample scores equal to the loop's (no timing asserted:
    ratios on a shared machine belong to the real run, recorded in benchmarks/RESULTS.md)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--rounds", "1", "--output", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    steps = {"floor", "fullft", "lora", "shira", "sparse", "sparse_loop", "sparse_teacher", "sparse_cached",
             "sparse_rows", "sparse_held"}
    fisher = {"loop", "per_sample", "batched"}
    assert set(res["step_time_s"]) == steps and set(res["peak_mem_mb"]) == steps | {"fullft_ckpt", "sparse_ckpt"}
    assert set(res["tensor_peak_mb"]) == {"sparse_loop", "sparse_teacher", "sparse_cached", "sparse_rows",
                                          "sparse_held"}
    assert set(res["fisher_time_s"]) == fisher
    assert all(v > 0 for v in res["step_time_s"].values())
    assert res["fisher_max_rel_err"] <= 1e-4
    assert set(res["ratios"]) == {"sparse_vs_floor_time", "sparse_vs_shira_time", "sparse_vs_lora_mem",
                                  "sparse_vs_fullft_mem", "loop_vs_per_sample_fisher", "per_sample_vs_batched_fisher",
                                  "sparse_ckpt_vs_fullft_mem", "sparse_ckpt_vs_fullft_ckpt_mem",
                                  "teacher_vs_loop_time", "teacher_vs_loop_mem", "teacher_vs_loop_tensors",
                                  "cached_vs_loop_time", "cached_vs_loop_mem", "cached_vs_loop_tensors",
                                  "held_vs_rows_time", "held_vs_rows_mem", "held_vs_rows_tensors"}
    # the teacher's forward is gone: in tensor bytes the cached term costs less than the per-step teacher
    assert res["tensor_peak_mb"]["sparse_cached"] < res["tensor_peak_mb"]["sparse_teacher"]
    assert "| sparse |" in (tmp_path / "table.md").read_text()


def test_bad_rounds_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--rounds", "0", "--output", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--rounds" in r.stderr
    assert not (tmp_path / "results.json").exists()


def test_gpu_check_script_without_a_gpu_is_one_line_exit_2():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                         "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr[-1000:]
    assert r.stderr.strip().splitlines() == ["gpu_check: --device cuda: no CUDA device here "
                                             "(torch.cuda.is_available() is False)"]


@pytest.mark.slow
def test_gpu_check_logic_on_cpu():
    """The same code a GPU runs, in bf16 on CPU: frozen weights bit-identical, chosen ones moved, loss down, peaks
    measured and planned for both phases."""
    from benchmarks.gpu_check import report, run
    res = run("cpu", "quick", 3, True)
    assert all(res["checks"].values()), res["checks"]
    assert [r["phase"] for r in res["peaks"]] == ["score", "train"]
    assert all(r["planned"] > 0 and r["measured"] > 0 for r in res["peaks"])
    assert "frozen weights bit-identical" in report(res)


@pytest.mark.slow
def test_gpu_check_script_runs_every_method_on_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --device cpu`: the sparse check, then every method of --method through the loop
    in bf16, each finishing with bf16 weights; exit 0 (the small preset's peaks within 15 % of the plan's, as on a
    GPU; the quick preset is a toy whose fixed overheads the plan overestimates by ~17 % in training)."""
    from piece_mm.continual import METHODS
    out = tmp_path / "res.json"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--steps", "3",
                        "--output", str(out)], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rows = json.loads(out.read_text())["methods"]
    assert [row["method"] for row in rows] == sorted(METHODS)
    assert all(row["ok"] and row["weights_bf16"] for row in rows), rows
    assert all(row["planned"] for row in rows)
