import numpy as np
import pytest

from piece_mm.tasks import world
from piece_mm.tasks.base import exact_match, normalize_answer


def _pixels(examples):
    return [np.asarray(ex.image) for ex in examples]


def test_same_seed_same_world():
    a, b = world.caption_set(5, 20), world.caption_set(5, 20)
    assert [(e.prompt, e.answer, e.refs) for e in a] == [(e.prompt, e.answer, e.refs) for e in b]
    assert all((x == y).all() for x, y in zip(_pixels(a), _pixels(b)))
    t1, t2 = world.task_set("color", "train", 30), world.task_set("color", "train", 30)
    assert [(e.prompt, e.answer) for e in t1] == [(e.prompt, e.answer) for e in t2]
    assert all((x == y).all() for x, y in zip(_pixels(t1), _pixels(t2)))


def test_different_seeds_differ():
    a, b = _pixels(world.caption_set(5, 20)), _pixels(world.caption_set(6, 20))
    assert any((x != y).any() for x, y in zip(a, b))
    tr, te = world.task_set("count", "train", 50), world.task_set("count", "test", 50)
    assert any((x != y).any() for x, y in zip(_pixels(tr), _pixels(te)))


def test_drawn_pixels_match_the_description():
    # The scene's colour is the most common non-background colour, and it sits in the described half.
    for s in world.scenes(3, 40):
        img = np.asarray(s.image()).astype(int)
        fg = (np.abs(img - np.array(world.BACKGROUND)).sum(-1) > 30)
        assert fg.any()
        mean = img[fg].mean(0)
        nearest = min(world.COLORS, key=lambda c: np.abs(np.array(world.COLORS[c]) - mean).sum())
        assert nearest == s.color
        ys, xs = np.nonzero(fg)
        h = world.IMAGE_SIZE // 2
        inside = {"left": xs < h, "right": xs >= h, "top": ys < h, "bottom": ys >= h}[s.position]
        assert inside.all(), s


def test_task_answers_follow_the_scene():
    spanish = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
               "white": "blanco"}
    seed = 1_000_000  # colour's seed block, fixed whatever tasks are added
    for ex, s in zip(world.task_set("color", "train", 20), world.scenes(seed, 20)):
        assert ex.answer == spanish[s.color]
    answers = {ex.answer for ex in world.task_set("location", "test", 100)}
    assert answers == {"west", "east", "north", "south"}


def test_vocabulary_covers_every_text():
    vocab = set(world.vocabulary())
    texts = [e.prompt + " " + " ".join(e.refs) for e in world.caption_set(9, 50)]
    texts += [e.prompt + " " + e.answer for e in world.general_vqa_set(9, 50)]
    texts += [e.prompt + " " + e.answer for t in world.TASKS for e in world.task_set(t, "test", 20)]
    assert {w for t in texts for w in t.split()} <= vocab


def test_unknown_task_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        world.task_set("nope", "train", 1)


def test_normalised_exact_match():
    assert normalize_answer("The  Red, circle!") == "red circle"
    assert exact_match("a rojo", "rojo") == 1.0
    assert exact_match("rojos", "rojo") == 0.0


def test_prompted_vocabularies_answer_the_scene_in_the_named_words():
    # An independent reading of each prompt: the vocabulary named by its prompt, applied to the drawn scene.
    by_prompt = {q: (attr, mapping) for qs, attr, mapping in world.PROMPTED.values() for q in qs}
    examples, scenes = world.prompted_set(11, 300, choice_fraction=0.3), world.scenes(11, 300)
    choices = 0
    for ex, s in zip(examples, scenes):
        base, _, options = ex.prompt.partition(" , ")
        attr, mapping = by_prompt[base]
        assert ex.answer == mapping[getattr(s, attr)]
        if options:  # a two-way choice: the answer and another word of the same vocabulary
            a, b = options.split(" or ")
            assert ex.answer in (a, b) and a != b and {a, b} <= set(mapping.values())
            choices += 1
    assert 0.2 < choices / len(examples) < 0.4
    assert {world.prompted_set(11, 300)[i].prompt for i in range(300)} != {ex.prompt for ex in examples}


def test_the_default_tasks_stay_new_skills():
    # No prompt-selected vocabulary uses a default task's answers: those are known only as word facts.
    prompted = {str(w) for _, _, mapping in world.PROMPTED.values() for w in mapping.values()}
    facts = {a for _, a in world.KNOWLEDGE}
    for name in ("size", "color", "location", "count"):
        answers = {ex.answer for ex in world.task_set(name, "train", 200)}
        assert not answers & prompted, name
        assert answers <= facts, name


def test_every_default_task_names_its_vocabulary_in_its_prompt():
    # A task's prompt names a language or a kind of word that no general question uses: the prompt, not the picture,
    # decides which words answer it.
    general = {w for prompts, _ in world.GENERAL_QUESTIONS.values() for q in prompts for w in q.split()}
    for name in ("size", "color", "location", "count"):
        for q in world.TASKS[name][0]:
            assert set(q.split()) & {"spanish", "german", "compass"} and not {"spanish", "german", "compass"} & general
