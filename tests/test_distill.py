"""The budget's distill term (regularise.Distillation): the teacher is the model as the task began, run once per
example before the first step, its top-k log-probabilities cached; checked against the exact term computed here from a
copy of the task-start model."""
import copy
import dataclasses

import pytest
import torch

from piece_mm.batching import HELD, ROWS, collate, model_inputs
from piece_mm.budget import HELD_DEFAULTS, Budget, distill_of, held_of
from piece_mm.continual import METHODS, make_scheduler, train_task
from piece_mm.errors import InputError
from piece_mm.methods import TaskContext
from piece_mm.regularise import Distillation, TeacherCache
from piece_mm.tasks import world
from piece_mm.tasks.sequence import Task

W, T = 0.5, 2.0


def _ctx(task, output, resumed=False, **distill):
    budget = Budget(fractions={"llm": 0.01}, distill={"weight": W, "temperature": T, **distill}).to_dict()
    return TaskContext(lr=1e-2, seed=7, steps=3, batch_size=4, budget=budget, tasks=[task], output=output,
                       resumed=resumed, log=lambda s: None)


def _masks(model, seed=0):
    """A few random elements of three LLM weights."""
    gen = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if "language_model.layers" in n and p.dim() == 2][:3]
    return {n: torch.randperm(p.numel(), generator=gen)[:40].sort().values for n, p in named}


def _exact(teacher_logits, student_logits, keep):
    """T² · KL(teacher ‖ student), summed over the vocabulary and over the kept positions, in float64, by hand."""
    pt = torch.softmax(teacher_logits[keep].double() / T, -1)
    log_ps = torch.log_softmax(student_logits[keep].double() / T, -1)
    return T * T * (pt * (pt.log() - log_ps)).sum()


def _top_k(teacher_logits, student_logits, keep, k):
    """T² · KL of the (k + 1)-outcome distributions: the teacher's k likeliest tokens, and all the others as one."""
    pt = torch.softmax(teacher_logits[keep].double() / T, -1)
    ps = torch.softmax(student_logits[keep].double() / T, -1)
    idx = pt.topk(k, -1).indices
    p = torch.cat([pt.gather(-1, idx), 1 - pt.gather(-1, idx).sum(-1, keepdim=True)], -1)
    q = torch.cat([ps.gather(-1, idx), 1 - ps.gather(-1, idx).sum(-1, keepdim=True)], -1)
    return T * T * (p * (p.log() - q.log())).sum()


def _rows(processor, exs, held, own, kept=()):
    batch = collate(processor, [exs[i] for i in own] + [held[j] for j in kept], held=len(kept))
    batch[ROWS] = torch.tensor(list(own) + [len(exs) + j for j in kept], dtype=torch.long)
    return batch


def _moved(model, scale=0.02, seed=0):
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return m


@pytest.mark.parametrize("image_positions", [True, False])
def test_with_k_the_vocabulary_the_cached_term_is_the_exact_term(tiny, image_positions):
    """top_k None (the whole vocabulary): each part's sum over its count equals the exact term within 1e-5 per batch,
    on the task's rows (held at every non-padding position with image_positions, else at the text positions; averaged
    over every non-padding position either way) and on the held rows' answers; so does the gradient. The teacher is
    the model when prepare ran, not the one it is asked about."""
    _, base, processor = tiny
    exs, held = world.task_set("size", "train", 8, seed=3), world.caption_set(3, 3)
    reg = Distillation(weight=1.0, temperature=T, top_k=None, held_weight=3.0,
                       image_positions=image_positions).prepare(base, processor, exs, held, batch_size=3)
    student = _moved(base).eval()
    batch = _rows(processor, exs, held, [2, 5, 3, 7], [1, 0])
    image = batch["input_ids"] == base.config.image_token_id
    with torch.no_grad():
        teacher = base(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    rows = torch.zeros_like(image)
    rows[:4] = True
    every = batch["attention_mask"].bool() & rows  # what the task's part is averaged over, either way
    task_keep = every & (~image if not image_positions else True)  # where it is held
    assert image.any() and reg.counts(batch).tolist() == [int(every.sum()), int(batch[HELD].sum())]
    assert int(batch[HELD].sum()) > 0
    student.zero_grad()
    out = student(**model_inputs(batch))
    got = reg(student, batch, out) / reg.counts(batch)
    want = torch.stack([_exact(teacher, out.logits.detach(), task_keep) / every.sum(),
                        3.0 * _exact(teacher, out.logits.detach(), batch[HELD]) / batch[HELD].sum()])
    assert float(want.min()) > 1e-3
    assert (got.double().detach() - want).abs().max() <= 1e-5, (got, want)
    got.sum().backward()
    g = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    ref = copy.deepcopy(student)
    ref.zero_grad()
    logits = ref(**model_inputs(batch)).logits
    (_exact(teacher, logits, task_keep) / every.sum() + 3.0 * _exact(teacher, logits, batch[HELD])
     / batch[HELD].sum()).backward()
    a = torch.cat([g[n].double().reshape(-1) for n, p in ref.named_parameters() if n in g])
    b = torch.cat([p.grad.double().reshape(-1) for n, p in ref.named_parameters() if n in g])
    assert b.norm() > 0 and (a - b).norm() <= 1e-4 * b.norm()  # float32 against float64, as one vector


def test_top_k_keeps_the_kl_of_the_teachers_k_likeliest_and_the_rest_as_one(tiny):
    """At k < vocabulary the term is the KL of k + 1 outcomes (the teacher's k likeliest tokens and the rest of the
    mass), computed here from whole distributions; at the default k it is within a few % of the exact term."""
    _, base, processor = tiny
    exs = world.task_set("color", "train", 6, seed=2)
    student = _moved(base, seed=1).eval()
    batch = _rows(processor, exs, [], range(6))
    with torch.no_grad():
        teacher = base(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
        out = student(**model_inputs(batch))
    for k in (4, 32):
        reg = Distillation(weight=1.0, temperature=T, top_k=k).prepare(base, processor, exs)
        assert reg.cache.values.shape[-1] == k
        keep = reg.positions(batch)[0]
        got = float(reg(student, batch, out)[0])
        assert got == pytest.approx(float(_top_k(teacher, out.logits, keep, k)), rel=1e-5)
        assert got <= float(_exact(teacher, out.logits, keep)) * (1 + 1e-6)  # merging outcomes never adds KL
    assert got == pytest.approx(float(_exact(teacher, out.logits, keep)), rel=0.05)


def test_the_teacher_is_the_task_start_model_and_a_resumed_task_reads_its_cache(tiny, tmp_path):
    """PIECE-F with distill: the cache is written before the first step; after three steps the term equals the exact
    formula against a copy of the task-start model (k = vocabulary); a resumed task reads the cache back without
    running the model; a damaged cache, or one made with another k, is one line that names the file."""
    _, base, processor = tiny
    model = copy.deepcopy(base)
    task = Task("color", world.task_set("color", "train", 16), world.task_set("color", "test", 4))
    start = copy.deepcopy(model).eval()
    masks = _masks(model)
    ctx = _ctx(task, tmp_path, top_k=None, image_positions=True)
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=masks)
    path = tmp_path / "distill" / "1-color.teacher.safetensors"
    assert path.is_file() and isinstance(tuning.regulariser, Distillation)
    batch = _rows(processor, task.train, [], range(4))
    model.train()
    with torch.no_grad():
        # zero at the task-start model, per held position (a sum over ~100-300 positions carries float noise of
        # ~1e-7 each, which the teacher's per-example forward and this batched one round differently)
        at_start = tuning.regulariser(model, batch, model(**model_inputs(batch)))[0] / tuning.regulariser.counts(batch)
        assert float(at_start) == pytest.approx(0.0, abs=1e-6)
    opt = tuning.optimizer
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 4, 0, "t", regulariser=tuning.regulariser)
    params = dict(start.named_parameters())
    assert any(not torch.equal(p, params[n]) for n, p in model.named_parameters() if n in masks)  # it learned
    model.eval()
    out = model(**model_inputs(batch))
    got = tuning.regulariser(model, batch, out) / tuning.regulariser.counts(batch)
    with torch.no_grad():
        teacher = start(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    keep = batch["attention_mask"].bool()
    want = W * _exact(teacher, out.logits.detach(), keep) / keep.sum()
    assert float(want) > 1e-6 and float(got[0]) == pytest.approx(float(want), abs=1e-6)
    tuning.close()

    def refuse(*a, **k):
        raise AssertionError("a resumed task must read the teacher's cache, not run the teacher")
    forward, model.forward = model.forward, refuse
    again = METHODS["piece-f"].for_task(model, processor, task, dataclasses.replace(ctx, resumed=True), masks=masks)
    model.forward = forward
    assert torch.equal(again.regulariser.cache.values, tuning.regulariser.cache.values)
    same = again.regulariser(model, batch, out) / again.regulariser.counts(batch)
    assert float(same[0]) == pytest.approx(float(got[0]), rel=1e-6)
    again.close()

    other = dataclasses.replace(_ctx(task, tmp_path, top_k=8, image_positions=True), resumed=True)
    with pytest.raises(InputError, match=r"1-color\.teacher\.safetensors: a teacher cache made with top_k") as e:
        METHODS["piece-f"].for_task(model, processor, task, other, masks=masks)
    assert "\n" not in str(e.value)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(InputError, match=r"1-color\.teacher\.safetensors: the teacher's cache cannot be read"):
        METHODS["piece-f"].for_task(model, processor, task, dataclasses.replace(ctx, resumed=True), masks=masks)


def test_a_cache_holds_a_few_values_per_text_position_and_its_rows_are_checked(tiny, tmp_path):
    """The default keeps 32 log-probabilities per text position (no image placeholder), saved as safetensors; a batch
    whose rows are not the prepared ones is refused."""
    _, base, processor = tiny
    exs = world.task_set("size", "train", 5, seed=3)
    reg = Distillation().prepare(base, processor, exs, path=tmp_path / "c.safetensors")
    n_text = sum(int(((b["attention_mask"] == 1) & (b["input_ids"] != base.config.image_token_id)).sum())
                 for b in (collate(processor, [ex]) for ex in exs))
    assert reg.cache.values.shape == (n_text, 32) and reg.cache.offsets.tolist()[-1] == n_text
    again = TeacherCache.load(tmp_path / "c.safetensors", reg.meta())
    assert torch.equal(again.values, reg.cache.values) and torch.equal(again.indices, reg.cache.indices)
    batch = collate(processor, exs[:2])
    with pytest.raises(InputError, match="which prepared rows"):
        reg(base, batch, base(**batch))
    batch[ROWS] = torch.tensor([3, 0])  # the rows of other examples, whose lengths differ
    lengths = [int(reg.cache.offsets[i + 1] - reg.cache.offsets[i]) for i in (0, 3)]
    if lengths[0] != lengths[1]:
        with pytest.raises(InputError, match="not made from the prepared examples"):
            reg(base, batch, base(**batch))


def test_distill_off_adds_no_term_and_bad_values_are_one_line(tmp_path):
    """weight 0 (the dataclass's default) adds nothing; a bad distill field names the file, the field and the value,
    and the command exits with 2 before anything is written."""
    from piece_mm.train import main

    assert Budget().distill == {"weight": 0.0, "temperature": 2.0, "answers": True, "top_k": 32,
                                "image_positions": False, "cache_dir": None, "held": HELD_DEFAULTS}
    assert Budget.from_yaml("default").distill["weight"] > 0  # the shipped default distils
    # a budget dict made by hand (the library API) may lack the field, or switch it off: no term either way
    assert distill_of({"fractions": {"llm": 0.01}}) is None and distill_of(Budget().to_dict()) is None
    assert distill_of(Budget(distill={"weight": 0.5}).to_dict()) == {
        "weight": 0.5, "temperature": 2.0, "answers": True, "top_k": 32, "image_positions": False, "cache_dir": None,
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
                        ({"weight": 1, "held": {"earlier_form": "yes"}}, r"distill\.held\.earlier_form is 'yes'"),
                        ({"weight": 1, "held": {"crops": 1.5}}, r"distill\.held\.crops is 1\.5"),
                        ({"weight": 1, "answers": "no"}, r"distill\.answers is 'no'"),
                        ({"weight": 1, "top_k": 0}, r"distill\.top_k is 0"),
                        ({"weight": 1, "top_k": 2.5}, r"distill\.top_k is 2\.5"),
                        ({"weight": 1, "image_positions": "yes"}, r"distill\.image_positions is 'yes'"),
                        ({"weight": 1, "cache_dir": ""}, r"distill\.cache_dir is ''"),
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
    ctx = _ctx(task, tmp_path, weight=0.0)
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=_masks(model))
    assert tuning.regulariser is None and not (tmp_path / "distill").exists()
    tuning.close()


def test_held_prompts_hold_the_teachers_own_answers_beside_the_task(tiny, tmp_path):
    """With distill.held on, the task's images asked the bank's and the earlier tasks' prompts are answered by the
    model as the task begins (its greedy replies, written for resume); in a batch they are rows the task loss does not
    learn, and the term is W·KL on the task's rows plus W_held·KL on the held rows' answer predictions, against the
    task-start model, by hand."""
    from piece_mm.eval.generate import generate

    _, base, processor = tiny
    model = copy.deepcopy(base)
    start = copy.deepcopy(model).eval()
    first = Task("big", world.task_set("big", "train", 8), [])
    task = Task("many", world.task_set("many", "train", 16), world.task_set("many", "test", 4))
    WH = 3.0
    ctx = dataclasses.replace(  # lr 0.1: a move the term sees in float32
        _ctx(task, tmp_path, top_k=None, image_positions=True, held={
            "weight": WH, "pool": 12, "per_step": 3, "earlier": 1, "max_new_tokens": 6}),
        tasks=[first, task], index=1, lr=0.1,
        generate=lambda m, p, exs, n: generate(m, p, exs, batch_size=8, max_new_tokens=n))
    masks = _masks(model)
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=masks)
    held = tuning.held_examples
    assert len(held) == 12 and tuning.held_per_step == 3
    assert first.train[0].prompt in {ex.prompt for ex in held}  # an earlier task's prompt, as a string
    assert not {ex.prompt for ex in held} & {ex.prompt for ex in task.train}  # the task's own are learned
    train_images = [ex.image for ex in task.train]
    assert all(any(ex.image is im for im in train_images) for ex in held)  # the task's own images only
    assert [ex.answer for ex in held] == generate(start, processor, held, batch_size=8, max_new_tokens=6)

    batch = _rows(processor, task.train, held, range(4), range(3))
    plain = collate(processor, task.train[:4] + held[:3])
    assert (batch["labels"][4:] == -100).all() and torch.equal(batch["labels"][:4], plain["labels"][:4])
    assert torch.equal(batch[HELD][4:, :-1], plain["labels"][4:, 1:] != -100) and not batch[HELD][:4].any()
    model.train()
    with torch.no_grad():
        alone = model(**collate(processor, task.train[:4])).loss
    with torch.no_grad():
        assert float(model(**model_inputs(batch)).loss) == pytest.approx(float(alone), rel=1e-5)  # not learned

    opt = tuning.optimizer
    train_task(model, processor, task, opt, make_scheduler(opt, 3), 3, 4, 0, "t", regulariser=tuning.regulariser,
               held=held, held_per_step=3)
    model.train()
    out = model(**model_inputs(batch))
    reg = tuning.regulariser
    got = reg(model, batch, out) / reg.counts(batch)  # two parts, each a mean over its own positions
    with torch.no_grad():
        teacher = start(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    rows = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    rows[:4] = True
    own = batch["attention_mask"].bool() & rows
    want = [W * _exact(teacher, out.logits.detach(), own) / own.sum(),
            WH * _exact(teacher, out.logits.detach(), batch[HELD]) / batch[HELD].sum()]
    assert len(got) == 2 and all(float(g.detach()) > 1e-6 for g in got)
    assert [float(g.detach()) for g in got] == pytest.approx([float(w) for w in want], abs=1e-5)  # per batch
    # each part's positions, for the loop to divide by over several processes or micro-batches
    assert reg.counts(batch).tolist() == [int(own.sum()), int(batch[HELD].sum())]
    tuning.close()

    # resumed: the same held examples, read back (nothing is generated)
    def refuse(*a):
        raise AssertionError("a resumed task must not generate its held examples again")
    again = METHODS["piece-f"].for_task(model, processor, task,
                                        dataclasses.replace(ctx, resumed=True, generate=refuse), masks=masks)
    assert [(ex.prompt, ex.answer) for ex in again.held_examples] == [(ex.prompt, ex.answer) for ex in held]
    assert all(a.image is b.image for a, b in zip(again.held_examples, held))
    again.close()


def test_earlier_form_answers_an_earlier_prompt_among_its_tasks_answers_and_holds_the_teacher_over_them(tiny,
                                                                                                        tmp_path):
    """held.earlier_form: an earlier task's prompt asked of this task's pictures is answered with the choice of that
    task's answers the task-start model finds likeliest (summed log-likelihood, by hand), and the cached teacher there
    is the task-start model's distribution over the tokens those answers can have at each position, by hand; the
    bank's rows are the greedy replies as before; a resumed task reads the choices back."""
    from piece_mm.eval.generate import generate
    from piece_mm.tasks.base import Example

    _, base, processor = tiny
    model = copy.deepcopy(base)
    start = copy.deepcopy(model).eval()
    first = Task("grid", world.task_set("grid", "train", 40), [])
    task = Task("relation", world.task_set("relation", "train", 16), world.task_set("relation", "test", 4))
    ctx = dataclasses.replace(
        _ctx(task, tmp_path, top_k=None, held={"weight": 3.0, "pool": 12, "per_step": 3, "earlier": 2,
                                               "max_new_tokens": 6, "earlier_form": True}),
        tasks=[first, task], index=1,
        generate=lambda m, p, exs, n: generate(m, p, exs, batch_size=8, max_new_tokens=n))
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=_masks(model))
    held = tuning.held_examples
    cells = tuple(dict.fromkeys(ex.answer for ex in first.train))
    formed = [j for j, ex in enumerate(held) if ex.prompt in {e.prompt for e in first.train}]
    assert formed and len(formed) < len(held)
    for j, ex in enumerate(held):
        if j not in formed:  # the bank's: greedy, no choices
            assert not ex.choices and [ex.answer] == generate(start, processor, [ex], max_new_tokens=6)
            continue
        assert ex.choices == cells and ex.answer in cells
        with torch.no_grad():  # sum of log-likelihoods = mean loss x the answer's tokens, per choice
            like = []
            for c in cells:
                b = collate(processor, [Example(ex.image, ex.prompt, c)])
                like.append(float(start(**b).loss) * int((b["labels"][:, 1:] != -100).sum()))
        assert ex.answer == cells[like.index(min(like))]

    reg = tuning.regulariser
    for j in formed[:3]:
        ex = held[j]
        b = collate(processor, [ex], held=1)
        with torch.no_grad():
            logits = start(**{k: v for k, v in model_inputs(b).items() if k != "labels"}).logits[0][b[HELD][0]]
        seqs = []
        for c in cells:
            lab = collate(processor, [Example(ex.image, ex.prompt, c)])["labels"][0]
            seqs.append(lab[lab != -100].tolist())
        mine = seqs[cells.index(ex.answer)]
        values, indices, _, n = reg.cache.rows(torch.tensor([len(task.train) + j]))
        assert n == [len(mine)] == [len(logits)]
        for i in range(len(mine)):
            allowed = sorted({s[i] for s in seqs if len(s) > i and s[:i] == mine[:i]})
            want = torch.zeros(logits.shape[-1], dtype=torch.float64)
            want[allowed] = torch.softmax(logits[i, allowed].double() / T, -1)
            got = torch.zeros_like(want).scatter_(0, indices[i].long(), values[i].double().exp())
            assert torch.allclose(got, want, atol=1e-6)
    tuning.close()

    def refuse(*a):
        raise AssertionError("a resumed task must not answer its held examples again")
    again = METHODS["piece-f"].for_task(model, processor, task,
                                        dataclasses.replace(ctx, resumed=True, generate=refuse), masks=_masks(model))
    assert [(ex.prompt, ex.answer, ex.choices) for ex in again.held_examples] == \
        [(ex.prompt, ex.answer, ex.choices) for ex in held]
    again.close()


def test_held_crops_ask_about_a_crop_of_the_tasks_pictures_and_a_resumed_task_cuts_the_same(tiny, tmp_path):
    """held.crops: that share of the held rows shows a crop of one of the task's pictures (scaled back to its size),
    answered by the task-start model about the crop; a resumed task rebuilds the very same pixels from the file."""
    import numpy as np

    from piece_mm.eval.generate import generate

    _, base, processor = tiny
    model = copy.deepcopy(base)
    task = Task("relation", world.task_set("relation", "train", 16), world.task_set("relation", "test", 4))
    ctx = dataclasses.replace(
        _ctx(task, tmp_path, held={"weight": 3.0, "pool": 16, "per_step": 3, "max_new_tokens": 6, "crops": 0.5}),
        generate=lambda m, p, exs, n: generate(m, p, exs, batch_size=8, max_new_tokens=n))
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=_masks(model))
    held = tuning.held_examples
    own = [ex.image for ex in task.train]
    crops = [ex for ex in held if not any(ex.image is im for im in own)]
    assert 3 <= len(crops) <= 13 and all(ex.image.size == own[0].size for ex in crops)
    assert [ex.answer for ex in crops] == generate(base, processor, crops, batch_size=8, max_new_tokens=6)
    tuning.close()

    def refuse(*a):
        raise AssertionError("a resumed task must not answer its held examples again")
    again = METHODS["piece-f"].for_task(model, processor, task,
                                        dataclasses.replace(ctx, resumed=True, generate=refuse), masks=_masks(model))
    for a, b in zip(again.held_examples, held):
        assert (a.prompt, a.answer) == (b.prompt, b.answer)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    again.close()


def test_record_base_keeps_each_elements_value_from_before_its_first_task_and_at_base_puts_it_back(tiny, tmp_path):
    from piece_mm.delta import load_delta
    from piece_mm.methods.held import at_base, record_base

    _, base, _ = tiny
    model = copy.deepcopy(base)
    first, second = _masks(model, seed=0), _masks(model, seed=1)  # the same three weights, overlapping elements
    path = tmp_path / "base.safetensors"
    record_base(model, first, path)
    moved = copy.deepcopy(model)  # "after the first task": only the elements it chose moved (a sparse method)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in first:
                p.view(-1)[first[n]] += torch.randn(len(first[n]), generator=gen)
    record_base(moved, second, path)
    record = load_delta(path)
    params, now = dict(base.named_parameters()), {n: p.detach().clone() for n, p in moved.named_parameters()}
    for n in first:
        want = torch.unique(torch.cat([first[n], second[n]]))
        idx, vals = record[n]
        assert torch.equal(idx.sort().values, want)  # each element once
        assert torch.equal(vals, params[n].detach().reshape(-1)[idx])  # its base value, also where both chose it
    with at_base(moved, record):
        for n, p in moved.named_parameters():
            flat, idx = p.detach().reshape(-1), record[n][0] if n in record else None
            if idx is not None:
                assert torch.equal(flat[idx], params[n].detach().reshape(-1)[idx])
                rest = torch.ones_like(flat, dtype=torch.bool)
                rest[idx] = False
                assert torch.equal(flat[rest], now[n].reshape(-1)[rest])  # the rest untouched
    assert all(torch.equal(p, now[n]) for n, p in moved.named_parameters())  # restored to the bit


def test_bank_teacher_base_answers_and_holds_the_banks_prompts_with_the_base_and_the_earlier_ones_with_the_model(
        tiny, tmp_path):
    """distill.held.bank_teacher: base, at the second task: the bank's held rows are the base's greedy replies and
    its cached teacher; the earlier task's prompts and the task's own rows are the model's as the task begins; the
    model is left as it was, to the bit."""
    from piece_mm.eval.generate import generate
    from piece_mm.methods.held import BASE_FILE, record_base

    _, base, processor = tiny
    first = Task("big", world.task_set("big", "train", 8), [])
    task = Task("many", world.task_set("many", "train", 16), world.task_set("many", "test", 4))
    model = copy.deepcopy(base)
    earlier_masks = _masks(model)
    record_base(model, earlier_masks, tmp_path / "distill" / BASE_FILE)  # as the first task's mask was chosen
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "the first task": only its chosen elements move, far enough to change some replies
        for n, p in model.named_parameters():
            if n in earlier_masks:
                p.view(-1)[earlier_masks[n]] += 20.0 * torch.randn(len(earlier_masks[n]), generator=gen)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = dataclasses.replace(
        _ctx(task, tmp_path, top_k=8, held={"weight": 3.0, "pool": 16, "per_step": 3, "earlier": 1,
                                            "max_new_tokens": 6, "bank_teacher": "base"}),
        tasks=[first, task], index=1,
        generate=lambda m, p, exs, n: generate(m, p, exs, batch_size=8, max_new_tokens=n))
    tuning = METHODS["piece-f"].for_task(model, processor, task, ctx, masks=_masks(model, seed=5))
    tuning.close()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    held = tuning.held_examples
    earlier = {first.train[0].prompt}
    on_bank = [j for j, ex in enumerate(held) if ex.prompt not in earlier]
    on_model = [j for j, ex in enumerate(held) if ex.prompt in earlier]
    assert on_bank and on_model
    base_replies = generate(base, processor, held, batch_size=8, max_new_tokens=6)
    model_replies = generate(model, processor, held, batch_size=8, max_new_tokens=6)
    assert [held[j].answer for j in on_bank] == [base_replies[j] for j in on_bank]
    assert [held[j].answer for j in on_model] == [model_replies[j] for j in on_model]
    assert any(base_replies[j] != model_replies[j] for j in on_bank)  # the checks above tell the teachers apart

    reg, n = tuning.regulariser, len(task.train)
    by = {name: Distillation(weight=W, temperature=T, top_k=8, held_weight=3.0).prepare(m, processor, task.train, held)
          for name, m in (("base", base), ("model", model))}
    for rows, who in ((list(range(n)), "model"), ([n + j for j in on_model], "model"),
                      ([n + j for j in on_bank], "base")):
        ids = torch.tensor(rows)
        got, want, other = reg.cache.rows(ids), by[who].cache.rows(ids), by[
            "model" if who == "base" else "base"].cache.rows(ids)
        assert got[3] == want[3] and torch.equal(got[1], want[1])
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[2], want[2], atol=1e-5)
        if who == "base":
            assert not torch.allclose(got[0], other[0], atol=1e-5)


@pytest.mark.parametrize("field, value, says", [("bank_teacher", "first", "distill.held.bank_teacher is 'first'"),
                                                ("paraphrases", 1.5, "distill.held.paraphrases is 1.5"),
                                                ("paraphrases", "most", "distill.held.paraphrases is 'most'")])
def test_bank_teacher_and_paraphrases_out_of_range_are_one_line(field, value, says):
    with pytest.raises(InputError, match=says):
        Budget(fractions={"llm": 0.01}, distill={"weight": 1.0, "held": {"weight": 1.0, field: value}})


def test_paraphrases_are_the_bank_prompts_answered_as_the_tasks_own_on_enough_of_its_images(tiny, tmp_path):
    from piece_mm.methods.held import make_held, paraphrases
    from piece_mm.tasks.base import Example

    exs = [Example(f"img{i}", "what color are the shapes", "") for i in range(10)]
    color = {f"img{i}": ("red" if i % 2 else "blue") for i in range(10)}

    def generate(model, processor, asked, n):  # a stand-in model: what it replies to each prompt on each image
        out = []
        for ex in asked:
            i = int(ex.image[3:])
            if ex.prompt in ("what color are the shapes", "say the color"):
                out.append(color[ex.image])
            elif ex.prompt == "which color":  # the same reply on 8 of the 10 images, in another case
                out.append(color[ex.image].upper() if i < 8 else "green")
            elif ex.prompt == "name a color":  # the same on 7 of 10
                out.append(color[ex.image] if i < 7 else "green")
            else:
                out.append("a shape")
        return out
    bank = ["say the color", "which color", "name a color", "describe the image"]
    assert paraphrases(None, None, exs, bank, generate, {"paraphrases": 0.8, "max_new_tokens": 4}) == [
        "say the color", "which color"]
    assert paraphrases(None, None, exs, bank, generate, {"paraphrases": 0.7, "max_new_tokens": 4}) == bank[:3]
    assert paraphrases(None, None, exs, bank, generate, {"paraphrases": 1.0, "max_new_tokens": 4}) == bank[:1]
    # in make_held: the rewordings are not held, the rest of the bank is
    (tmp_path / "bank.yaml").write_text("prompts:\n" + "".join(f"  - {p}\n" for p in bank))
    processor = tiny[2]
    options = {**HELD_DEFAULTS, "bank": str(tmp_path / "bank.yaml"), "pool": 10, "max_new_tokens": 4}
    held, _ = make_held(None, processor, exs, {**options, "paraphrases": 0.8}, generate)
    assert {ex.prompt for ex in held} == {"name a color", "describe the image"}
    held, _ = make_held(None, processor, exs, options, generate)  # 0: every bank prompt held
    assert {ex.prompt for ex in held} == set(bank)
