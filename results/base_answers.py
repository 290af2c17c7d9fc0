"""python results/base_answers.py: what the tiny base models answer to the default sequence's questions before any
tuning (200 test questions per task). Measured for results/README.md; it trains nothing."""
# "English attribute": the answer is the attribute in the words pretraining taught (what the matching general
# question would get), i.e. the model heard the task's question as that old question.
import piece_mm as pm
from eval.generate import generate
from tasks import world

ENGLISH = {"tiny": "small", "huge": "big", "rojo": "red", "verde": "green", "azul": "blue", "amarillo": "yellow",
           "morado": "purple", "blanco": "white", "west": "left", "east": "right", "north": "top", "south": "bottom",
           "eins": "one", "zwei": "two", "drei": "three"}
for alias in ("llava", "qwen2-vl"):
    model, proc = pm.load_model(alias)
    model.eval()
    for name in ("size", "color", "location", "count"):
        exs = world.task_set(name, "test", 200)
        preds = generate(model, proc, exs, batch_size=50, max_new_tokens=8)
        eng = sum(p.strip() == ENGLISH[e.answer] for p, e in zip(preds, exs)) / len(exs)
        own = sum(p.strip() == e.answer for p, e in zip(preds, exs)) / len(exs)
        print(f"{alias:9s} {name:9s} English attribute {eng:.2f}  task answer {own:.2f}")
