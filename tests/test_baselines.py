"""Baseline methods of the continual loop: LayerNorm tuning, replay, multitask, EWC, LwF."""
from pathlib import Path

import pytest
import torch

from piece_mm.continual import METHODS, make_scheduler, train_task
from piece_mm.methods.ln import norm_params
from piece_mm.tasks import world
from piece_mm.tasks.sequence import Task


def _seq(n=20):
    return [Task(name, world.task_set(name, "train", n), world.task_set(name, "test", 4))
            for name in ("color", "size", "count")]


def _cfg(tasks, index, method, lr=1e-3, output=Path("unused")):
    from piece_mm.methods import TaskContext, load_settings
    return TaskContext(lr=lr, seed=7, steps=2, batch_size=4, tasks=tasks, index=index, output=output,
                       settings=load_settings(method))


def test_ln_trains_only_normalisation_layers(tiny):
    """Two steps of LN tuning: every norm weight that gets a gradient moves, every other weight is bit-identical."""
    import copy
    _, base, processor = tiny
    model = copy.deepcopy(base)
    tasks = _seq(8)
    opt = METHODS["ln"].for_task(model, processor, tasks[0], _cfg(tasks, 0, method="ln")).optimizer
    norms = set(norm_params(model))
    assert norms and {n for n, p in model.named_parameters() if p.requires_grad} == norms
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_task(model, processor, tasks[0], opt, make_scheduler(opt, 2), 2, 4, 0, "t")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= norms
    assert any("language_model" in n for n in moved)


def test_replay_mixes_ten_percent_of_each_earlier_task():
    tasks = _seq(20)
    opt = METHODS["replay"].for_task(torch.nn.Linear(2, 2), None, tasks[2], _cfg(tasks, 2, method="replay"))
    ex = opt.train_examples
    assert ex[:20] == tasks[2].train and len(ex) == 20 + 2 + 2
    for t in tasks[:2]:
        assert sum(any(e is x for x in t.train) for e in ex) == 2  # 10 % of 20, drawn from that task
    again = METHODS["replay"].for_task(torch.nn.Linear(2, 2), None, tasks[2],
                                       _cfg(tasks, 2, method="replay")).train_examples
    assert [id(e) for e in again] == [id(e) for e in ex]  # seeded: a resumed task rebuilds the same mix
    first = METHODS["replay"].for_task(torch.nn.Linear(2, 2), None, tasks[0], _cfg(tasks, 0, method="replay"))
    assert first.train_examples == tasks[0].train


def test_multitask_trains_on_every_task_so_far():
    tasks = _seq(5)
    opt = METHODS["multitask"].for_task(torch.nn.Linear(2, 2), None, tasks[1], _cfg(tasks, 1, method="multitask"))
    assert opt.train_examples == tasks[0].train + tasks[1].train


def test_ewc_pull_and_fisher(tiny, tmp_path):
    """The pull is (λ/2) Σ F (θ − θ*)²: zero at the anchor, gradient λ F (θ − θ*) (checked against that formula);
    after_task gives a Fisher of mean 1 (first task) that adds up over tasks, and anchors at the current weights."""
    import copy

    EWC_LAMBDA = 0.1  # configs/methods/ewc.yaml
    _, base, processor = tiny
    model = copy.deepcopy(base)
    tasks = _seq(16)
    first = METHODS["ewc"].for_task(model, processor, tasks[0], _cfg(tasks, 0, method="ewc", output=tmp_path))
    assert first.regulariser is None
    state = first.after_task(model)
    f = state["fisher"]
    mean = sum(float(t.sum()) for t in f.values()) / sum(t.numel() for t in f.values())
    assert mean == pytest.approx(1.0, rel=1e-5)
    params = dict(model.named_parameters())
    assert all(torch.equal(state["anchor"][n], params[n].detach()) for n in f)
    assert (tmp_path / "ewc" / "1-color.safetensors").is_file()  # the next task reads it from there
    second = METHODS["ewc"].for_task(model, processor, tasks[1], _cfg(tasks, 1, method="ewc", output=tmp_path))
    pull = second.regulariser  # one part, counted once per batch: the loop adds it whole to a one-batch step
    assert pull.counts({}).tolist() == [1.0]
    assert float(pull(model, {}, None).detach()) == 0.0
    name = next(n for n in f if f[n].abs().sum() > 0 and params[n].dim() == 2)
    with torch.no_grad():
        params[name].add_(0.01)
    model.zero_grad()
    pull(model, {}, None).sum().backward()
    assert torch.allclose(params[name].grad, EWC_LAMBDA * f[name] * 0.01, rtol=1e-4, atol=1e-9)
    later = second.after_task(model)
    assert all(bool((later["fisher"][n] >= f[n]).all()) for n in f)  # summed over the tasks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["replay", "ewc", "lwf", "seqlora", "olora", "migu"])
def test_baselines_run_through_the_cli(method, tmp_path):
    """The loop's hooks, end to end: replay's examples, EWC's saved Fisher, LwF's saved teacher."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    seq = tmp_path / "two.yaml"
    seq.write_text("tasks:\n  - {name: color, format: world}\n  - {name: size, format: world}\n"
                   "world: {train_examples: 16, test_examples: 4}\ngeneral: {captions: 4, vqa: 4}\n")
    r = subprocess.run([sys.executable, "-m", "piece_mm.train", "--model", "llava", "--method", method, "--tasks",
                        str(seq), "--max-steps", "2", "--batch-size", "4", "--eval-limit", "4", "--output",
                        str(tmp_path / "run")], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["method"] == method
    if method in ("seqlora", "olora"):  # the adapter only: r · (in + out) per LLM linear layer
        assert m["trainable"]["vision"] == m["trainable"]["projector"] == 0 and 0 < m["trainable"]["llm"]
        assert m["trainable"]["total"] < 0.1 * m["parameters"]
        from safetensors import safe_open
        with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]  # merged: a plain model
    else:
        assert min(m["trainable"][c] for c in ("vision", "projector", "llm")) > 0
    saved = {"ewc": "ewc/1-color.safetensors", "lwf": "lwf/2-size.safetensors",
             "olora": "olora/1-color.safetensors"}.get(method)
    assert saved is None or (tmp_path / "run" / saved).is_file()


def test_lwf_distils_from_the_task_start_model(tiny, tmp_path):
    """Zero while the student equals the teacher; after a change, T² · KL(teacher ‖ student) over the non-padding
    positions, computed here by hand."""
    import copy

    from piece_mm.batching import collate
    T = 2.0  # configs/methods/lwf.yaml
    _, base, processor = tiny
    model = copy.deepcopy(base)
    tasks = _seq(8)
    teacher = copy.deepcopy(model).eval()
    opt = METHODS["lwf"].for_task(model, processor, tasks[1], _cfg(tasks, 1, method="lwf", output=tmp_path))
    assert (tmp_path / "lwf" / "2-size.safetensors").is_file()  # a task resumed midway distils from the same
    batch = collate(processor, tasks[1].train[:4])
    model.eval()
    reg = opt.regulariser  # a sum over the batch's non-padding positions, and their count

    def term(out):
        return float((reg(model, batch, out) / reg.counts(batch)).detach())
    assert reg.counts(batch).tolist() == [float(batch["attention_mask"].sum())]
    assert term(model(**batch)) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model(**batch)
    got = term(out)
    with torch.no_grad():
        t_logits = teacher(**batch).logits
    ref, n = 0.0, 0
    for b in range(4):
        for pos in range(batch["input_ids"].shape[1]):
            if batch["attention_mask"][b, pos]:
                pt = torch.softmax(t_logits[b, pos] / T, -1)
                ps = torch.softmax(out.logits[b, pos].detach() / T, -1)
                ref += float((pt * (pt.log() - ps.log())).sum())
                n += 1
    assert got > 0 and got == pytest.approx(T * T * ref / n, rel=1e-3)
    first = METHODS["lwf"].for_task(model, processor, tasks[0], _cfg(tasks, 0, method="lwf", output=tmp_path))
    assert first.regulariser is not None  # from the first task on (tests/test_shared.py checks it)


def test_every_method_constant_is_in_its_yaml_and_checked(tmp_path):
    """configs/methods/<name>.yaml holds exactly the fields its method declares; a --method-config that names an
    unknown field, misses one, or has a value out of range is one error with the file, field and value."""
    import yaml

    from piece_mm.errors import InputError
    from piece_mm.methods import load_settings, settings_file
    with_settings = sorted(n for n, m in METHODS.items() if m.settings)
    assert with_settings == ["ewc", "lwf", "migu", "olora", "replay", "seqlora"]
    for name in METHODS:
        got = load_settings(name)
        if name in with_settings:
            assert got == yaml.safe_load(settings_file(name).read_text())
        else:
            assert got == {} and not settings_file(name).exists()
    assert load_settings("ewc") == {"lambda": 0.1, "examples": 256}
    f = tmp_path / "ewc.yaml"
    for text, says in [("lambda: 0.5\nexamples: 256\nlamda: 1\n", "unknown field 'lamda'"),
                       ("lambda: 0.5\n", "required field 'examples' is missing"),
                       ("lambda: -1\nexamples: 256\n", "field 'lambda' is -1"),
                       ("lambda: 0.5\nexamples: 2.5\n", "field 'examples' is 2.5; expected an integer"),
                       ("[1, 2]\n", "expected a mapping")]:
        f.write_text(text)
        with pytest.raises(InputError, match=says) as e:
            load_settings("ewc", f)
        assert str(f) in str(e.value) and "\n" not in str(e.value)
    f.write_text("lambda: 0.5\nexamples: 8\n")
    assert load_settings("ewc", f) == {"lambda": 0.5, "examples": 8}
    with pytest.raises(InputError, match="has no settings"):
        load_settings("seqft", f)
