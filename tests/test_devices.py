"""Every method on any device and dtype: what a method keeps sits on the weights' device, and bf16 weights do not lose
updates at the paper's lr (1e-5), whether the method tunes chosen elements (sparse.py's masters) or whole weights
(optim.py's masters)."""
import copy
import tempfile
from pathlib import Path

import pytest
import torch

from piece_mm.continual import METHODS, make_scheduler, train_task
from piece_mm.optim import MasterWeights, adamw
from piece_mm.regularise import Regulariser
from piece_mm.sparse import SparseOptimizer
from piece_mm.tasks import world
from piece_mm.tasks.sequence import Task

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_master_weights_follow_an_fp32_adamw_exactly():
    """bf16 weights at lr 1e-5: the masters take the steps an fp32 AdamW takes on the same gradients (computed here
    independently), the weights hold the masters rounded to bf16, and plain AdamW on the bf16 weights loses them."""
    torch.manual_seed(0)
    w = (torch.randn(64, 32) * 0.02).to(torch.bfloat16)
    grads = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(5)]
    p = torch.nn.Parameter(w.clone())
    opt = adamw([p], 1e-5, betas=(0.9, 0.95))
    assert isinstance(opt, MasterWeights)
    ref = torch.nn.Parameter(w.float().clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    plain = torch.nn.Parameter(w.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    for g in grads:
        for q, o, gg in ((p, opt, g), (ref, ref_opt, g.float()), (plain, plain_opt, g)):
            q.grad = gg.clone()
            o.step()
            o.zero_grad(set_to_none=True)
    master = opt._pairs[0][1]
    assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(master.detach(), ref.detach())
    assert torch.equal(p.detach(), ref.detach().to(torch.bfloat16))
    moved_master = float((master.detach() != w.float()).float().mean())
    moved_plain = float((plain.detach() != w).float().mean())
    assert moved_master > 0.99 and moved_plain < 0.2  # what plain AdamW on bf16 weights keeps of 5 steps at 1e-5


def test_master_weights_state_dict_round_trip():
    """A resumed optimizer continues from the same masters, which the rounded weights cannot give back."""
    torch.manual_seed(1)
    p = torch.nn.Parameter((torch.randn(16) * 0.02).to(torch.bfloat16))
    opt = adamw([p], 1e-5)
    for _ in range(3):
        p.grad = torch.randn(16).to(torch.bfloat16)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    again = adamw([q], 1e-5)
    again.load_state_dict(saved)
    assert torch.equal(again._pairs[0][1], opt._pairs[0][1])
    g = torch.randn(16).to(torch.bfloat16)
    for o, x in ((opt, p), (again, q)):
        x.grad = g.clone()
        o.step()
    assert torch.equal(p, q)


def test_fp32_weights_get_plain_adamw():
    p = torch.nn.Parameter(torch.zeros(3))
    assert type(adamw([p], 1e-3)) is torch.optim.AdamW


def _tasks():
    return [Task(n, world.task_set(n, "train", 16), world.task_set(n, "test", 4)) for n in ("color", "size")]


def _cfg(method, tasks, index, out, budget):
    from piece_mm.eval.generate import generate
    from piece_mm.methods import TaskContext, load_settings
    return TaskContext(lr=1e-5, seed=7, steps=4, batch_size=4, budget=budget, tasks=tasks, index=index, output=out,
                       settings=load_settings(method),
                       generate=lambda m, p, ex, n: generate(m, p, ex, batch_size=16, max_new_tokens=n))


def _optimizer_values(model, opt, before) -> tuple[int, int]:
    """(elements the optimizer tunes, how many of them moved), on the values it steps: the fp32 masters where it
    keeps them (the weights then hold them rounded), else the weights themselves."""
    if isinstance(opt, SparseOptimizer):
        pairs = [(before[n].reshape(-1)[idx].float(), c) for n, (_, idx, c) in zip(opt._names, opt._targets)]
    elif isinstance(opt, MasterWeights):
        names = {id(p): n for n, p in model.named_parameters()}
        pairs = [(before[names[id(p)]].to(m.dtype), m) for p, m in opt._pairs]
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        pairs = [(before[names[id(p)]], p) for g in opt.param_groups for p in g["params"]]
    return sum(a.numel() for a, _ in pairs), sum(int((a != b.detach()).sum()) for a, b in pairs)


def _tensors(obj, seen=None):
    """Every tensor reachable from a method's closures: its dicts, lists, modules and nested closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif isinstance(obj, Regulariser):  # its own fields; the teacher's cache lives in host memory by design
        yield from _tensors([v for k, v in vars(obj).items() if k != "cache"], seen)
    elif callable(obj) and getattr(obj, "__closure__", None):
        for cell in obj.__closure__:
            try:
                yield from _tensors(cell.cell_contents, seen)
            except ValueError:  # an empty cell
                pass


def _one_task(method, model, processor, tasks, index, out, budget):
    m = METHODS[method]
    cfg = _cfg(method, tasks, index, out, budget)
    t = m.for_task(model, processor, tasks[index], cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_task(model, processor, tasks[index], t.optimizer, make_scheduler(t.optimizer, 4), 4, 4, 0, "t",
               examples=t.train_examples, regulariser=t.regulariser, held=t.held_examples,
               held_per_step=t.held_per_step)
    return t, before


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_keeps_bf16_updates_and_its_state_on_the_weights_device(method, device, tiny):
    """Each method, 4 steps at lr 1e-5 on the same task from the same weights in fp32 and in bf16: the share of the
    elements it tunes that moved (on the values its optimizer steps) is within 1 % of the fp32 run's. Then, at the
    second task, every tensor the method keeps (optimizer state, masters, EWC's Fisher and anchor, LwF's teacher,
    O-LoRA's earlier adapters) sits on the weights' device."""
    from piece_mm.select import load_budget
    name, base, processor = tiny
    if name != "llava":
        pytest.skip("one model is enough here; both run the same optimizers")
    m = METHODS[method]
    budget = load_budget("default") if m.sparse else None
    tasks = _tasks()
    share = {}
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = copy.deepcopy(base).to(device=device, dtype=dt)
        if m.prepare is not None:
            m.prepare(model, _cfg(method, tasks, 0, None, budget).settings)
        out = Path(tempfile.mkdtemp())
        t, before = _one_task(method, model, processor, tasks, 0, out, budget)
        total, moved = _optimizer_values(model, t.optimizer, before)
        share[dt] = moved / total
        state = t.optimizer.state_dict()  # Adam's moments (and masters) after the steps
        if t.after_task is not None:
            t.after_task(model)
        if t.close is not None:
            t.close()
    assert share[torch.float32] > 0.5
    assert abs(share[torch.bfloat16] - share[torch.float32]) <= 0.01, share
    # the second task, bf16: what the method keeps is on the weights' device
    second = m.for_task(model, processor, tasks[1], _cfg(method, tasks, 1, out, budget))
    dev = next(model.parameters()).device
    kept = list(_tensors([second.regulariser, second.after_task, state]))
    if isinstance(second.optimizer, MasterWeights):
        kept += [m_ for _, m_ in second.optimizer._pairs]
    if isinstance(second.optimizer, SparseOptimizer):
        kept += [c for _, _, c in second.optimizer._targets]
    # Adam keeps its step count (a 0-dim tensor) on the CPU
    wrong = [tuple(t_.shape) for t_ in kept if t_.device != dev and t_.dim() > 0]
    assert not wrong, f"{method}: {len(wrong)} tensors off {dev}, e.g. {wrong[:3]}"
    if second.close is not None:
        second.close()
