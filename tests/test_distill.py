"""The budget's distill term for the sparse methods: the teacher is the model as the task began, made for one forward
pass by putting the chosen elements back to their task-start values (piece_mm/methods/piece.py)."""
import copy

import pytest
import torch

from piece_mm.batching import collate
from piece_mm.budget import HELD_DEFAULTS, Budget, distill_of, held_of
from piece_mm.continual import METHODS, make_scheduler, train_task
from piece_mm.errors import InputError
from piece_mm.methods import load_tensors
from piece_mm.tasks import world
from piece_mm.tasks.sequence import Task

W, T = 0.5, 2.0


def _cfg(task, output, resumed=False):
    budget = Budget(fractions={"llm": 0.01}, distill={"weight": W, "temperature": T}).to_dict()
    return {"lr": 1e-2, "seed": 7, "steps": 3, "batch_size": 4, "budget": budget, "tasks": [task], "index": 0,
            "output": output, "main": True, "resumed": resumed, "settings": {}, "log": lambda s: None,
            "gradient_checkpointing": False}


def _masks(model, seed=0):
    """A few random elements of three LLM weights."""
    gen = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if "language_model.layers" in n and p.dim() == 2][:3]
    return {n: torch.randperm(p.numel(), generator=gen)[:40].sort().values for n, p in named}


def _reference(teacher_logits, student_logits, keep):
    """W · T² · KL(teacher ‖ student), summed over the vocabulary and averaged over the kept positions, by hand."""
    pt = torch.softmax(teacher_logits[keep].double() / T, -1)
    log_ps = torch.log_softmax(student_logits[keep].double() / T, -1)
    return W * T * T * (pt * (pt.log() - log_ps)).sum(-1).mean()


def test_the_teacher_is_the_task_start_model_and_the_weights_come_back_bit_for_bit(tiny, tmp_path):
    """After three steps the term equals the formula against a copy of the model kept from the task's start; the
    forward inside it leaves every weight bit-identical; its gradient on the chosen elements is the formula's; a
    resumed task reads the same teacher from <output>/distill/."""
    _, base, processor = tiny
    model = copy.deepcopy(base)
    task = Task("color", world.task_set("color", "train", 16), world.task_set("color", "test", 4))
    start = copy.deepcopy(model).eval()
    masks = _masks(model)
    tuning = METHODS["piece-f"].for_task(model, processor, task, _cfg(task, tmp_path), masks=masks)
    saved = load_tensors(tmp_path / "distill" / "1-color.safetensors")
    params = dict(start.named_parameters())
    assert saved.keys() == masks.keys()
    assert all(torch.equal(saved[n], params[n].detach().reshape(-1)[masks[n]]) for n in masks)

    batch = collate(processor, task.train[:4])
    keep = batch["attention_mask"].bool()
    model.train()
    assert float(tuning.extra_loss(model, batch, model(**batch)).detach()) == pytest.approx(0.0, abs=1e-6)
    opt = tuning.optimizer
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 4, 0, "t", extra_loss=tuning.extra_loss)
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(now[n], params[n]) for n in masks)  # it learned something

    model.train()
    out = model(**batch)
    got = tuning.extra_loss(model, batch, out)
    assert all(torch.equal(p, now[n]) for n, p in model.named_parameters())  # the teacher's values are gone again
    with torch.no_grad():
        teacher = start(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want = _reference(teacher, out.logits.detach(), keep)
    assert float(got.detach()) > 1e-6 and float(got.detach()) == pytest.approx(float(want), rel=1e-3)

    got.backward()  # through the student's forward, which ran before the teacher's values came and went
    grads = dict(zip(masks, [c.grad for c in opt.compact_params()]))
    ref = copy.deepcopy(model).train()
    for p in ref.parameters():
        p.requires_grad_(True)
    _reference(teacher, ref(**batch).logits, keep).backward()
    for n, p in ref.named_parameters():
        if n in masks:
            a, b = grads[n].double(), p.grad.reshape(-1)[masks[n]].double()  # float32 against float64: as vectors
            assert (a - b).norm() <= 1e-3 * b.norm() and b.norm() > 0, n
    tuning.close()

    again = METHODS["piece-f"].for_task(model, processor, task, _cfg(task, tmp_path, resumed=True), masks=masks)
    model.train()
    same = again.extra_loss(model, batch, model(**batch))
    assert float(same.detach()) == pytest.approx(float(got.detach()), rel=1e-6)
    again.close()

    # a resumed task whose saved start values are damaged, or are another mask's: one line naming the file
    saved_file = tmp_path / "distill" / "1-color.safetensors"
    other = {n: idx[:30] for n, idx in masks.items()}
    with pytest.raises(InputError, match=r"1-color\.safetensors: not the start values") as e:
        METHODS["piece-f"].for_task(model, processor, task, _cfg(task, tmp_path, resumed=True), masks=other)
    assert "\n" not in str(e.value)
    saved_file.write_bytes(saved_file.read_bytes()[:50])
    with pytest.raises(InputError, match=r"1-color\.safetensors: a method's saved state cannot be read"):
        METHODS["piece-f"].for_task(model, processor, task, _cfg(task, tmp_path, resumed=True), masks=masks)


def test_distill_off_adds_no_term_and_bad_values_are_one_line(tmp_path):
    """weight 0 (the dataclass's default) adds nothing; a bad distill field names the file, the field and the value,
    and the command exits with 2 before anything is written."""
    from piece_mm.train import main

    assert Budget().distill == {"weight": 0.0, "temperature": 2.0, "answers": True, "held": HELD_DEFAULTS}
    assert Budget.from_yaml("default").distill["weight"] > 0  # the shipped default distils
    # a budget dict made by hand (the library API) may lack the field, or switch it off: no term either way
    assert distill_of({"fractions": {"llm": 0.01}}) is None and distill_of(Budget().to_dict()) is None
    assert distill_of(Budget(distill={"weight": 0.5}).to_dict()) == {"weight": 0.5, "temperature": 2.0, "answers": True,
                                                                      "held": HELD_DEFAULTS}
    assert held_of(Budget(distill={"weight": 0.5}).to_dict()) is None  # held prompts: off unless given a weight
    for value, says in [({"weight": -1}, r"distill\.weight is -1"), ({"temperature": 0}, r"distill\.temperature is 0"),
                        ({"temp": 1.0}, r"distill\.temp is not a distill option"), (3, "distill is 3"),
                        ({"weight": True}, r"distill\.weight is True"),
                        ({"weight": 1, "held": {"weight": -1}}, r"distill\.held\.weight is -1"),
                        ({"weight": 0, "held": {"weight": 1}}, r"distill\.held\.weight is 1 but distill\.weight is 0"),
                        ({"weight": 1, "held": {"pool": 0}}, r"distill\.held\.pool is 0"),
                        ({"weight": 1, "held": {"per_step": 2.5}}, r"distill\.held\.per_step is 2\.5"),
                        ({"weight": 1, "held": {"bank": ""}}, r"distill\.held\.bank is ''"),
                        ({"weight": 1, "held": {"earlier_share": 1.0}}, r"distill\.held\.earlier_share is 1\.0"),
                        ({"weight": 1, "held": {"protect": -0.5}}, r"distill\.held\.protect is -0\.5"),
                        ({"weight": 1, "answers": "no"}, r"distill\.answers is 'no'"),
                        ({"weight": 1, "held": {"weight": 1, "bank": "nope"}},
                         r"distill\.held\.bank 'nope': prompt bank not found"),
                        ({"weight": 1, "held": {"prompts": 1}}, r"distill\.held\.prompts is not a distill\.held")]:
        with pytest.raises(InputError, match=r"^Budget: " + says):
            Budget(distill=value)
    bad = tmp_path / "b.yaml"
    bad.write_text("fractions: {llm: 0.01}\ndistill: {weight: -2.0}\n")
    assert main(["--model", "llava", "--budget", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_weight_zero_gives_no_extra_loss(tiny, tmp_path):
    _, base, processor = tiny
    model = copy.deepcopy(base)
    task = Task("color", world.task_set("color", "train", 8), world.task_set("color", "test", 4))
    cfg = _cfg(task, tmp_path)
    cfg["budget"]["distill"] = {"weight": 0.0, "temperature": 2.0}
    tuning = METHODS["piece-f"].for_task(model, processor, task, cfg, masks=_masks(model))
    assert tuning.extra_loss is None and not (tmp_path / "distill").exists()
    tuning.close()


def test_held_prompts_hold_the_teachers_own_answers_beside_the_task(tiny, tmp_path):
    """With distill.held on, the task's images asked the bank's and the earlier tasks' prompts are answered by the
    model as the task begins (its greedy replies, written for resume); in a batch they are rows the task loss does not
    learn, and the term is W·KL on the task's rows plus W_held·KL on the held rows' answer predictions, against the
    task-start model, by hand."""
    from piece_mm.batching import HELD, model_inputs
    from piece_mm.eval.generate import generate

    _, base, processor = tiny
    model = copy.deepcopy(base)
    start = copy.deepcopy(model).eval()
    first = Task("big", world.task_set("big", "train", 8), [])
    task = Task("many", world.task_set("many", "train", 16), world.task_set("many", "test", 4))
    cfg = _cfg(task, tmp_path) | {"tasks": [first, task], "index": 1, "lr": 0.1}  # a move the term sees in float32
    WH = 3.0
    cfg["budget"] = Budget(fractions={"llm": 0.01}, distill={"weight": W, "temperature": T, "held": {
        "weight": WH, "pool": 12, "per_step": 3, "earlier": 1, "max_new_tokens": 6}}).to_dict()
    cfg["generate"] = lambda m, p, exs, n: generate(m, p, exs, batch_size=8, max_new_tokens=n)
    masks = _masks(model)
    tuning = METHODS["piece-f"].for_task(model, processor, task, cfg, masks=masks)
    held = tuning.held_examples
    assert len(held) == 12 and tuning.held_per_step == 3
    assert first.train[0].prompt in {ex.prompt for ex in held}  # an earlier task's prompt, as a string
    assert not {ex.prompt for ex in held} & {ex.prompt for ex in task.train}  # the task's own are learned
    train_images = [ex.image for ex in task.train]
    assert all(any(ex.image is im for im in train_images) for ex in held)  # the task's own images only
    assert [ex.answer for ex in held] == generate(start, processor, held, batch_size=8, max_new_tokens=6)

    batch = collate(processor, task.train[:4] + held[:3], held=3)
    plain = collate(processor, task.train[:4] + held[:3])
    assert (batch["labels"][4:] == -100).all() and torch.equal(batch["labels"][:4], plain["labels"][:4])
    assert torch.equal(batch[HELD][4:, :-1], plain["labels"][4:, 1:] != -100) and not batch[HELD][:4].any()
    model.train()
    with torch.no_grad():
        alone = model(**collate(processor, task.train[:4])).loss
    with torch.no_grad():
        assert float(model(**model_inputs(batch)).loss) == pytest.approx(float(alone), rel=1e-5)  # not learned

    opt = tuning.optimizer
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 4, 0, "t", extra_loss=tuning.extra_loss,
               held=held, held_per_step=3)
    model.train()
    out = model(**model_inputs(batch))
    got = tuning.extra_loss(model, batch, out)  # two parts, each a mean over its own positions
    with torch.no_grad():
        teacher = start(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    rows = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    rows[:4] = True
    want = [_reference(teacher, out.logits.detach(), batch["attention_mask"].bool() & rows),
            WH / W * _reference(teacher, out.logits.detach(), batch[HELD])]
    assert len(got) == 2 and all(float(g.detach()) > 1e-6 for g in got)
    assert [float(g.detach()) for g in got] == pytest.approx([float(w) for w in want], rel=3e-3)  # fp32 vs fp64
    # each part's positions, for the loop's shares under several processes or micro-batches
    counts = tuning.extra_per_position(batch)
    assert [int(c) for c in counts] == [int((batch["attention_mask"].bool() & rows).sum()), int(batch[HELD].sum())]
    tuning.close()

    # resumed: the same held examples, read back (nothing is generated)
    def refuse(*a):
        raise AssertionError("a resumed task must not generate its held examples again")
    again = METHODS["piece-f"].for_task(model, processor, task, cfg | {"resumed": True, "generate": refuse},
                                        masks=masks)
    assert [(ex.prompt, ex.answer) for ex in again.held_examples] == [(ex.prompt, ex.answer) for ex in held]
    assert all(a.image is b.image for a, b in zip(again.held_examples, held))
    again.close()
