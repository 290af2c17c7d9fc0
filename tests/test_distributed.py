import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SEQ = ("tasks:\n  - {name: color, format: world}\n  - {name: shape, format: world}\n"
       "world: {train_examples: 16, test_examples: 8}\ngeneral: {captions: 6, vqa: 6}\n")


def _train(out, seq, env=None, extra=()):
    return subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", "llava", "--tasks", str(seq),
                           "--max-steps", "4", "--batch-size", "4", "--eval-limit", "4", "--output", str(out),
                           *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_two_processes_choose_the_same_masks_and_take_the_same_steps(uninterrupted_run, tmp_path):
    """accelerate launch, 2 CPU processes (accelerate's torchrun path; its --cpu path starts MPI or one process):
    importance sums and compact gradients are summed across them, so masks and tuned values match one process."""
    from conftest import short_run_args

    from piece_mm.delta import load_delta, load_masks

    seq, one = uninterrupted_run
    # accelerate's launcher through this interpreter: in a venv, a bare `accelerate` on PATH may be another Python's
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--multi_gpu",
              "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run(launch + short_run_args(seq, tmp_path / "two")[1:], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert "over 2 processes" in two.stdout and two.stdout.count("OP ") == 1  # one writer
    for f in ("1-color", "2-shape"):
        a = load_masks(one / "masks" / f"{f}.safetensors")
        b = load_masks(tmp_path / "two" / "masks" / f"{f}.safetensors")
        total = sum(v.numel() for v in a.values())
        shared = sum(len(set(a[n].tolist()) & set(b.get(n, a[n][:0]).tolist())) for n in a)
        assert shared >= 0.999 * total, f
        da = load_delta(one / "deltas" / f"{f}.safetensors")
        db = load_delta(tmp_path / "two" / "deltas" / f"{f}.safetensors")
        if f == "1-color":  # same steps up to summation order, which Adam amplifies a little (task 2 starts apart)
            for n, (idx, vals) in da.items():
                if torch.equal(idx, db[n][0]):
                    assert (vals - db[n][1]).norm() <= 1e-2 * vals.norm(), n


@pytest.mark.slow
def test_unsupported_sharding_is_refused_in_one_line(tmp_path):
    """FSDP1 and DeepSpeed are refused naming the FSDP2 config; FSDP2 over one process, or with a method that has
    no sharded path, is refused too. Nothing is written."""
    seq = tmp_path / "two.yaml"
    seq.write_text(SEQ)
    cases = [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "fsdp2.yaml"),
             ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "fsdp2.yaml"),
             ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--method", "seqft"], "--method 'seqft'"),
             ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, [], "FSDP2 over 1 process")]
    for i, (env, extra, words) in enumerate(cases):
        r = _train(tmp_path / str(i), seq, env=env, extra=extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (env, r.stderr)
        assert not (tmp_path / str(i)).exists()


def test_sparse_optimizer_takes_dim0_shards_and_refuses_other_placements(tmp_path):
    """A DTensor sharded on dim 0 (FSDP2) holds one run of the flat indices, which the optimizer indexes; any other
    placement would be indexed wrongly, so it is refused with a clear error."""
    code = f"""
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Replicate, Shard
import piece_mm as pm
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
for placement in (Shard(0), Replicate()):
    lin = torch.nn.Linear(4, 4)
    lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [placement]))
    try:
        opt = pm.sparse_optimizer(lin, {{"weight": torch.tensor([0, 5])}}, torch.optim.AdamW)
        print("taken:", placement, [c.numel() for c in opt.compact_params()])
    except TypeError as e:
        print("refused:", e)
dist.destroy_process_group()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "taken: S(0) [2]" in r.stdout, r.stderr[-2000:]
    assert "refused: sparse_optimizer: parameter 'weight' is sharded in a way sparse tuning cannot index" in r.stdout


def test_dist_helpers_are_the_identity_for_one_process():
    from piece_mm import dist
    t = torch.arange(4.0)
    dist.sum_([t])
    assert dist.world() == 1 and dist.rank() == 0 and dist.is_main() and torch.equal(t, torch.arange(4.0))
    assert dist.share([1, 2, 3]) == [1, 2, 3]
