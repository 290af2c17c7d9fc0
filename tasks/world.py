"""The built-in visual world: procedurally drawn scenes, their descriptions, and tasks made from them.

A scene is 1-3 identical shapes (one shape, one colour, one size) grouped in one half of a 64x64 image. Everything is
drawn with PIL from a `random.Random(seed)`, so the same seed always gives the same pixels and the same text.

Three kinds of data come out of the world:
- `caption_set`: general captioning (several phrasings, several prompts), for pretraining and for retention;
- `general_vqa_set`: general questions (colour, shape, count, position, size, existence) that a base model must answer;
- `knowledge_set` and `prompted_set`: text-only word facts, and one attribute asked under prompts that name the
  answer's vocabulary (pretraining only: they teach the bases that the prompt decides what is said);
- `task_set`: downstream tasks, one per question type, each a new skill that rests on what the base already perceives
  (answers remapped to words the base never produces).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .base import Example

IMAGE_SIZE = 64
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 30),
    "purple": (160, 40, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "big": 7}  # radius in pixels
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND = (25, 25, 25)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    count: int
    position: str
    centers: tuple  # ((x, y), ...) in pixels

    def image(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(img)
        r = SIZES[self.size]
        fill = COLORS[self.color]
        for x, y in self.centers:
            if self.shape == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            elif self.shape == "square":
                draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)  # the circle's box: corners tell them apart
            else:
                pts = [(x + r * 1.15 * math.cos(a), y + r * 1.15 * math.sin(a))
                       for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
                draw.polygon(pts, fill=fill)
        return img

    @property
    def noun(self) -> str:
        return self.shape + ("s" if self.count > 1 else "")

    def phrase(self) -> str:
        """'two big red circles' / 'a small blue square'."""
        det = "a" if self.count == 1 else COUNT_WORDS[self.count]
        return f"{det} {self.size} {self.color} {self.noun}"

    def where(self) -> str:
        return f"on the {self.position}" if self.position in ("left", "right") else f"at the {self.position}"

    def captions(self) -> list[str]:
        """Reference captions, canonical first (the one pretraining teaches for the describe prompt)."""
        p, w = self.phrase(), self.where()
        verb = "is" if self.count == 1 else "are"
        return [
            f"{p} {w}",
            f"there {verb} {p} {w}",
            f"{w} there {verb} {p}",
            f"an image of {p} {w}",
        ]


def _region(position: str) -> tuple[int, int, int, int]:
    h = IMAGE_SIZE // 2
    return {"left": (0, 0, h, IMAGE_SIZE), "right": (h, 0, IMAGE_SIZE, IMAGE_SIZE),
            "top": (0, 0, IMAGE_SIZE, h), "bottom": (0, h, IMAGE_SIZE, IMAGE_SIZE)}[position]


def sample_scene(rng: random.Random) -> Scene:
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    size, count, position = rng.choice(sorted(SIZES)), rng.choice(COUNTS), rng.choice(POSITIONS)
    e = math.ceil(SIZES[size] * 1.15)  # the drawn extent: a triangle's corners reach 1.15 r from its center
    x0, y0, x1, y1 = _region(position)
    vertical = position in ("left", "right")  # shapes spread along the half's long axis, one slot each
    lo, hi = (y0, y1) if vertical else (x0, x1)
    slot = (hi - lo) / count
    centers = []
    for k in range(count):
        if count == 1:  # a lone shape stays near the middle of the long axis, so "left" is never also "top"
            mid = (lo + hi) // 2
            along = rng.randint(mid - e // 2, mid + e // 2)
        else:
            along = rng.randint(math.ceil(lo + k * slot + e), math.floor(lo + (k + 1) * slot - e - 1))
        across = rng.randint(x0 + e + 1, x1 - e - 2) if vertical else rng.randint(y0 + e + 1, y1 - e - 2)
        centers.append((across, along) if vertical else (along, across))
    return Scene(shape, color, size, count, position, tuple(centers))


def scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# General ability: captioning and general VQA (what the base model is pretrained on, and what retention measures)

CAPTION_PROMPTS = [  # prompt -> index into Scene.captions()
    ("describe the image", 0),
    ("write a short caption", 0),
    ("what do you see in the image", 1),
    ("describe the scene in a sentence", 2),
    ("caption this picture", 3),
]
CAPTION_EVAL_PROMPT = "describe the image"
# Retention is measured under several prompts. The UNSEEN ones are for evaluation only: no method is given them in
# training, scoring or regularisation (no task asks them, and the distillation term's prompt bank,
# configs/prompts/generic.yaml, may not name them: tests/test_prompts.py checks both), so their retention says what a
# method keeps where it cannot look. The evaluation prompt above and the first phrasing of each general question are
# SEEN: a method may hold the model on them.
UNSEEN_CAPTION_PROMPTS = ("what do you see in the image", "describe the scene in a sentence", "caption this picture")
HELDOUT_CAPTION_SEED = 900_001  # the general set that measures retention; pretraining uses seeds < 100
HELDOUT_VQA_SEED = 900_002

GENERAL_QUESTIONS = {
    "color": (["what color are the shapes", "which color is shown", "name the color of the shapes"],
              lambda s: s.color),
    "shape": (["what shape is shown", "which shape do you see", "name the shape"], lambda s: s.shape),
    "count": (["how many shapes are there", "count the shapes", "what is the number of shapes"],
              lambda s: COUNT_WORDS[s.count]),
    "position": (["where are the shapes", "which side are the shapes on", "in which part of the image are the shapes",
                  "where in the image are the shapes", "on which side is the shape"],
                 lambda s: s.position),
    "size": (["are the shapes big or small", "what size are the shapes", "how large are the shapes"],
             lambda s: s.size),
}


SEEN_QUESTIONS = tuple(prompts[0] for prompts, _ in GENERAL_QUESTIONS.values()) + ("is there a",)
UNSEEN_EXISTS = "do you see a"  # "do you see a red circle": the unseen phrasing of the existence question


def unseen_question(question: str) -> bool:
    """Whether a general-VQA question is asked in a phrasing that no method is given (UNSEEN_CAPTION_PROMPTS' note)."""
    if question.startswith("is there a ") or question in SEEN_QUESTIONS:
        return False
    return question.startswith(UNSEEN_EXISTS + " ") or any(question in prompts for prompts, _ in
                                                           GENERAL_QUESTIONS.values())


def caption_set(seed: int, n: int, prompt: str | None = None) -> list[Example]:
    """Captioning examples. With `prompt`, every example uses it and its canonical caption (for evaluation);
    otherwise the prompt cycles through CAPTION_PROMPTS. `refs` always holds all reference phrasings."""
    rng = random.Random(seed + 7919)
    out = []
    for s in scenes(seed, n):
        caps = s.captions()
        if prompt is None:
            p, i = rng.choice(CAPTION_PROMPTS)
        else:
            p, i = prompt, dict(CAPTION_PROMPTS).get(prompt, 0)
        out.append(Example(s.image(), p, caps[i], refs=tuple(caps)))
    return out


def general_vqa_set(seed: int, n: int) -> list[Example]:
    rng = random.Random(seed + 104729)
    out = []
    for s in scenes(seed, n):
        kind = rng.choice(sorted(GENERAL_QUESTIONS) + ["exists"])
        if kind == "exists":
            # half true, half about another colour or shape
            color = s.color if rng.random() < 0.5 else rng.choice(sorted(COLORS))
            shape = s.shape if rng.random() < 0.5 else rng.choice(SHAPES)
            q = rng.choice([f"is there a {color} {shape}", f"{UNSEEN_EXISTS} {color} {shape}"])
            a = "yes" if (color, shape) == (s.color, s.shape) else "no"
        else:
            prompts, fn = GENERAL_QUESTIONS[kind]
            q, a = rng.choice(prompts), fn(s)
        out.append(Example(s.image(), q, a))
    return out


# Word knowledge, asked without reference to the picture ("what is red in spanish" -> "rojo"). A real VLM's language
# model knows such facts; the downstream tasks then compose them with perception, which is the new skill.
KNOWLEDGE = (
    [(f"what is {c} in spanish", w) for c, w in {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
                                                 "purple": "morado", "white": "blanco"}.items()]
    + [(f"what is {n} in german", w) for n, w in {"one": "eins", "two": "zwei", "three": "drei"}.items()]
    + [(f"which compass direction is {p}", w) for p, w in {"left": "west", "right": "east", "top": "north",
                                                             "bottom": "south"}.items()]
    + [(f"how many corners does a {s} have", w) for s, w in {"circle": "none", "square": "four",
                                                             "triangle": "three"}.items()]
    + [(f"what is another word for {z}", w) for z, w in {"small": "tiny", "big": "huge"}.items()]
    + [(f"what is {z} in spanish", w) for z, w in {"small": "pequeno", "big": "grande"}.items()]
)


def knowledge_set(seed: int, n: int) -> list[Example]:
    """Word-knowledge questions, text only: a real VLM's language model learned such facts from text. (Asked beside
    an unrelated picture, they taught the tiny LLaVA that a question may ignore the image, and its perception of
    size and shape came out weaker.)"""
    rng = random.Random(seed + 15485863)
    return [Example(None, *rng.choice(KNOWLEDGE)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt-selected vocabularies (pretraining only). A real instruction-tuned VLM says what the prompt asks for: "the
# colour in French" and "a fruit of that colour" get different words about the same red circle, and a caption gets
# neither. These examples teach the tiny bases that property: one perceived attribute, asked under prompts that name
# the answer's vocabulary. None of them is a downstream task's vocabulary (Spanish colours and sizes, compass
# directions, German numbers): those stay new skills, known only as word facts. A share of them are two-way choices
# ("..., rouge or bleu"), so the named words, not the attribute alone, decide the reply.

PROMPTED = {  # name -> (prompts, attribute, {attribute value: answer})
    "color-french": (["what is the color in french", "say the color in french"], "color",
                     {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
                      "white": "blanc"}),
    "color-fruit": (["which fruit has the color of the shapes", "name a fruit of that color"], "color",
                    {"red": "cherry", "green": "lime", "blue": "blueberry", "yellow": "banana", "purple": "grape",
                     "white": "coconut"}),
    "color-gem": (["which gem has the color of the shapes", "name a gem of that color"], "color",
                  {"red": "ruby", "green": "emerald", "blue": "sapphire", "yellow": "topaz", "purple": "amethyst",
                   "white": "pearl"}),
    "count-roman": (["how many shapes in roman numerals", "count the shapes in roman numerals"], "count",
                    {1: "i", 2: "ii", 3: "iii"}),
    "count-digits": (["how many shapes in digits", "count the shapes in digits"], "count", {1: "1", 2: "2", 3: "3"}),
    "count-clock": (["how many shapes as a clock hour", "say the count of shapes as an hour"], "count",
                    {1: "one oclock", 2: "two oclock", 3: "three oclock"}),
    "count-french": (["how many shapes in french", "count the shapes in french"], "count",
                     {1: "un", 2: "deux", 3: "trois"}),
    "size-synonym": (["give a synonym for the size", "say the size with another word"], "size",
                     {"small": "little", "big": "large"}),
    "size-french": (["what is the size in french", "say the size in french"], "size",
                    {"small": "petit", "big": "grand"}),
    "shape-object": (["which everyday object has that shape", "name an object with that shape"], "shape",
                     {"circle": "coin", "square": "box", "triangle": "tent"}),
    "shape-french": (["what is the shape in french", "say the shape in french"], "shape",
                     {"circle": "cercle", "square": "carre", "triangle": "triangle"}),
    "position-french": (["which side are the shapes in french", "say where the shapes are in french"], "position",
                        {"left": "gauche", "right": "droite", "top": "haut", "bottom": "bas"}),
    "position-italian": (["which side are the shapes in italian", "say where the shapes are in italian"], "position",
                         {"left": "sinistra", "right": "destra", "top": "sopra", "bottom": "sotto"}),
    "position-letter": (["give the first letter of the side", "which letter starts the side of the shapes"],
                        "position", {"left": "l", "right": "r", "top": "t", "bottom": "b"}),
    "position-hand": (["which hand side are the shapes on", "point at the shapes with a word"], "position",
                      {"left": "leftward", "right": "rightward", "top": "upward", "bottom": "downward"}),
}


def prompted_set(seed: int, n: int, choice_fraction: float = 0.2) -> list[Example]:
    """Pretraining examples of the prompt-selected vocabularies, `choice_fraction` of them two-way choices."""
    rng = random.Random(seed + 32452843)
    names = sorted(PROMPTED)
    out = []
    for s in scenes(seed, n):
        prompts, attr, mapping = PROMPTED[rng.choice(names)]
        answer, q = mapping[getattr(s, attr)], rng.choice(prompts)
        if rng.random() < choice_fraction:
            other = rng.choice([w for w in mapping.values() if w != answer])
            pair = [answer, other] if rng.random() < 0.5 else [other, answer]
            q = f"{q} , {pair[0]} or {pair[1]}"
        out.append(Example(s.image(), q, answer))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Downstream tasks: one per question type. Each maps a perceived attribute to an answer vocabulary the base never
# produced, which is a new skill the model can learn from a few hundred examples.

TASKS = {
    "color": (["what is the color in spanish", "say the color in spanish"],
              lambda s: {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
                         "purple": "morado", "white": "blanco"}[s.color]),
    "shape": (["how many corners does the shape have", "count the corners of one shape"],
              lambda s: {"circle": "none", "square": "four", "triangle": "three"}[s.shape]),
    # Worded like the prompt-selected position questions ("which side are the shapes in french"): with "which compass
    # direction are the shapes", a near twin of the general "which side are the shapes on", the compass words
    # answered the general position questions too after the task (position VQA 1.00 -> 0.1 on the tiny LLaVA).
    "location": (["which side are the shapes in compass directions", "say where the shapes are in compass directions"],
                 lambda s: {"left": "west", "right": "east", "top": "north", "bottom": "south"}[s.position]),
    "count": (["how many shapes in german", "count the shapes in german"],
              lambda s: {1: "eins", 2: "zwei", 3: "drei"}[s.count]),
    # Names its vocabulary like the others: "tiny or huge" did not, and its answers were synonyms of caption words,
    # so the size task leaked into captions on every base and with every method.
    "size": (["what is the size in spanish", "say the size in spanish"],
             lambda s: {"small": "pequeno", "big": "grande"}[s.size]),
    # Yes/no questions of a kind the base was never asked, answered with words captions never use. Unlike the
    # renaming tasks above, learning them does not require saying something new about what captions describe.
    "big": (["are the shapes big", "is the shape big"], lambda s: "yes" if s.size == "big" else "no"),
    "many": (["are there many shapes", "do you see many shapes"], lambda s: "yes" if s.count > 1 else "no"),
    "corners": (["do the shapes have corners", "does the shape have corners"],
                lambda s: "no" if s.shape == "circle" else "yes"),
}
# Seed block of each task's scenes; fixed so that adding a task never changes another task's data.
_TASK_SEED_INDEX = {"color": 0, "count": 1, "location": 2, "shape": 3, "size": 4, "big": 5, "many": 6, "corners": 7,
                    "stripes": 8, "letter": 9, "grid": 10, "relation": 11, "mixed": 12, "outline": 13}


# ---------------------------------------------------------------------------------------------------------------------
# The shared-format tasks (configs/sequences/world-shared.yaml). Pictures the bases never saw, asked plain questions in
# the general set's style and answered with the general set's own words (or one short fixed form), as VQA-v2's
# question types share one answer format. No prompt names its vocabulary, so each task competes with the general
# questions for the same words. Each picture kind is new to the bases:
# - stripes: one large shape filled with stripes of two colours; "what color are the shapes" (the general question
#   itself, asked of a new kind of picture) -> both colours, alphabetical ("blue red");
# - letter: a letter drawn as a bitmap glyph (the OCR task) -> the letter (a, b, i, l, r, t: the letters the
#   tokenizer has as words);
# - grid: one shape in one cell of a 3x3 grid (the grounding task) -> "row column" ("1 3" = top row, right column);
# - relation: a small and a big shape of two kinds, one above or beside the other; "where is the small shape" -> its
#   side of the big one. Vertical pairs sit in the left or right half and horizontal pairs in the top or bottom half,
#   so the general position answer ("where are the shapes") is never the right one;
# - mixed: four to six shapes in two colours; "what color are the shapes" (the general question again) -> both
#   colours, alphabetical;
# - outline: a big shape drawn with small shapes of another kind (never drawn in pretraining); "which big shape do
#   you see" -> the big shape and what it is drawn with, as one fixed form ("triangle of circles").
# Near twins: grid's "where is the shape" and relation's "where is the small shape"; stripes and mixed both ask the
# general colour question ("what color are the shapes") of new pictures and answer in one form; outline and letter are
# a word away from the general shape questions ("which shape do you see", "what shape is shown").
# Tried and replaced (SeqFT, 300 steps, both bases, learned to 0.2-0.5 only): "where is the circle" of two shapes by
# kind or by colour, "how many circles are there" among four to six shapes, and the grid cell of the one shape of
# another kind or colour among four to six. The bases learn a new read-out of the whole picture in 300 steps (where
# the mass is, which colours, what outline), not which of several objects is which.

_GLYPHS = {  # 5 x 7 bitmaps, drawn 4 pixels to a dot
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "b": ("#....", "#....", "####.", "#...#", "#...#", "#...#", "####."),
    "i": ("..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."),
    "l": (".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "r": (".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."),
    "t": ("..#..", "..#..", "#####", "..#..", "..#..", "..#.#", "...#."),
}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def _shape(draw, shape: str, x: float, y: float, r: float, fill) -> None:
    """One filled shape, drawn as Scene.image draws it."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x + r * 1.15 * math.cos(a), y + r * 1.15 * math.sin(a))
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=fill)


def _canvas():
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    return img, ImageDraw.Draw(img)


def _stripes(rng: random.Random):
    a, b = rng.sample(sorted(COLORS), 2)
    shape, r = rng.choice(SHAPES), rng.randint(16, 20)
    x, y = rng.randint(r + 4, IMAGE_SIZE - r - 5), rng.randint(r + 4, IMAGE_SIZE - r - 5)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _shape(ImageDraw.Draw(mask), shape, x, y, r, 255)
    img, draw = _canvas()
    width, phase = rng.choice((3, 4)), rng.randint(0, 7)
    horizontal = rng.random() < 0.5
    for k in range(IMAGE_SIZE):  # stripes of `width` pixels, alternating a and b
        c = COLORS[a] if ((k + phase) // width) % 2 == 0 else COLORS[b]
        draw.line([(0, k), (IMAGE_SIZE, k)] if horizontal else [(k, 0), (k, IMAGE_SIZE)], fill=c)
    out, _ = _canvas()
    out.paste(img, (0, 0), mask)
    return out, None, " ".join(sorted((a, b)))


def _letter(rng: random.Random):
    letter = rng.choice(sorted(_GLYPHS))
    dot = 4
    x0, y0 = rng.randint(2, IMAGE_SIZE - 5 * dot - 2), rng.randint(2, IMAGE_SIZE - 7 * dot - 2)
    img, draw = _canvas()
    fill = COLORS[rng.choice(sorted(COLORS))]
    for j, row in enumerate(_GLYPHS[letter]):
        for i, c in enumerate(row):
            if c == "#":
                draw.rectangle([x0 + i * dot, y0 + j * dot, x0 + (i + 1) * dot - 1, y0 + (j + 1) * dot - 1], fill=fill)
    return img, None, letter


def _grid(rng: random.Random):
    row, col = rng.randint(1, 3), rng.randint(1, 3)
    cell, r = IMAGE_SIZE / 3, 5
    x = (col - 0.5) * cell + rng.randint(-3, 3)
    y = (row - 0.5) * cell + rng.randint(-3, 3)
    img, draw = _canvas()
    _shape(draw, rng.choice(SHAPES), x, y, r, COLORS[rng.choice(sorted(COLORS))])
    return img, None, f"{row} {col}"


def _relation(rng: random.Random):
    """Two different shapes, a small and a big one, one above the other or side by side -> the small one's side
    of the big one."""
    vertical = rng.random() < 0.5
    half = rng.choice(("left", "right") if vertical else ("top", "bottom"))
    x0, y0, x1, y1 = _region(half)
    img, draw = _canvas()
    small_first = rng.random() < 0.5  # first = top (vertical) or left (horizontal)
    radii = (4, 8) if small_first else (8, 4)
    shapes, colors = rng.sample(SHAPES, 2), [COLORS[rng.choice(sorted(COLORS))] for _ in range(2)]
    if vertical:
        x = rng.randint(x0 + 12, x1 - 13)
        for shape, y, r, c in zip(shapes, (rng.randint(y0 + 10, 22), rng.randint(42, y1 - 11)), radii, colors):
            _shape(draw, shape, x + rng.randint(-2, 2), y, r, c)
    else:
        y = rng.randint(y0 + 12, y1 - 13)
        for shape, x, r, c in zip(shapes, (rng.randint(x0 + 10, 22), rng.randint(42, x1 - 11)), radii, colors):
            _shape(draw, shape, x, y + rng.randint(-2, 2), r, c)
    return img, None, (("top", "bottom") if vertical else ("left", "right"))[not small_first]


def _mixed(rng: random.Random):
    """Four to six shapes of one kind in two colours, one to a cell of a 3 x 3 grid -> both colours, alphabetical."""
    total = rng.randint(4, 6)
    a, b = rng.sample(sorted(COLORS), 2)
    colors = [a, b] + [rng.choice((a, b)) for _ in range(total - 2)]
    cells = rng.sample([(i, j) for i in range(3) for j in range(3)], total)
    img, draw = _canvas()
    cell, r, shape = IMAGE_SIZE / 3, 5, rng.choice(SHAPES)
    for c, (i, j) in zip(colors, cells):
        _shape(draw, shape, (j + 0.5) * cell + rng.randint(-2, 2), (i + 0.5) * cell + rng.randint(-2, 2), r, COLORS[c])
    return img, None, " ".join(sorted((a, b)))


def _outline(rng: random.Random):
    big = rng.choice(SHAPES)
    small = rng.choice([s for s in SHAPES if s != big])
    cx, cy, R = rng.randint(28, 36), rng.randint(28, 36), rng.randint(20, 24)
    if big == "circle":
        pts = [(cx + R * math.cos(2 * math.pi * k / 10), cy + R * math.sin(2 * math.pi * k / 10)) for k in range(10)]
    else:
        corners = ([(cx - R, cy - R), (cx + R, cy - R), (cx + R, cy + R), (cx - R, cy + R)] if big == "square" else
                   [(cx + R * 1.1 * math.cos(a), cy + R * 1.1 * math.sin(a))
                    for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        per = 3 if big == "square" else 4
        pts = [(ax + (bx - ax) * t / per, ay + (by - ay) * t / per)
               for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]) for t in range(per)]
    img, draw = _canvas()
    fill = COLORS[rng.choice(sorted(COLORS))]
    for x, y in pts:
        _shape(draw, small, x, y, 3, fill)
    return img, None, f"{big} of {_PLURAL[small]}"


# name -> (prompts, picture sampler); a prompt's {} is filled with what the sampler asks about
SHARED = {
    "stripes": (["what color are the shapes", "what color is the shape"], _stripes),
    "letter": (["which letter is shown", "what letter do you see"], _letter),
    "grid": (["where is the shape", "in which part of the picture is the shape"], _grid),
    "relation": (["where is the small shape", "where in the picture is the small shape"], _relation),
    "mixed": (["what color are the shapes", "what color do the shapes have"], _mixed),
    "outline": (["which big shape do you see", "what big shape is shown"], _outline),
}


def task_set(name: str, split: str, n: int, seed: int = 0) -> list[Example]:
    if name not in TASKS and name not in SHARED:
        raise KeyError(f"unknown world task {name!r}; known: {', '.join(sorted([*TASKS, *SHARED]))}")
    if split not in ("train", "test"):
        raise KeyError(f"unknown split {split!r} for world task {name!r}; expected train or test")
    # Disjoint seed ranges per task and split, so a test scene is never a training scene by construction of the seed.
    base = 1_000_000 * (1 + _TASK_SEED_INDEX[name]) + (0 if split == "train" else 500_000) + 1000 * seed
    rng = random.Random(base + 17)
    if name in SHARED:
        prompts, sample = SHARED[name]
        out = []
        for _ in range(n):
            img, asked, answer = sample(rng)
            out.append(Example(img, rng.choice(prompts).format(asked), answer))
        return out
    prompts, fn = TASKS[name]
    return [Example(s.image(), rng.choice(prompts), fn(s)) for s in scenes(base, n)]


def vocabulary(knowledge: bool = True) -> list[str]:
    """Every word the world can say or ask, for building the tiny models' word-level tokenizer."""
    texts = [p for p, _ in CAPTION_PROMPTS] + ["is there a do you see yes no"]
    texts += [f"{q} {a}" for q, a in KNOWLEDGE] if knowledge else []
    for prompts, _ in list(GENERAL_QUESTIONS.values()) + list(TASKS.values()):
        texts += prompts
    for prompts, _, mapping in PROMPTED.values():
        texts += prompts + [str(w) for w in mapping.values()] + ["or"]
    for shape, color, size, count, position in itertools.product(SHAPES, COLORS, SIZES, COUNTS, POSITIONS):
        s = Scene(shape, color, size, count, position, ())
        texts += s.captions()
        texts += [fn(s) for _, fn in list(GENERAL_QUESTIONS.values()) + list(TASKS.values())]
    return sorted({w for t in texts for w in t.split()})
