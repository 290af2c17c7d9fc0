"""LLaVA conversation data (a JSON list, or JSONL): {"id", "image" (optional), "conversations": [{"from", "value"}]}.

- `<image>` in a human turn marks the picture: it must be in the first human turn, at most once. It is taken out of
  the text, and the picture goes before the text, or after it when the placeholder ends the turn.
- Every assistant turn is trained on; a test example is scored on the last one.
- A record without "image" (and without `<image>`) is a text-only example.
"""
from __future__ import annotations

from pathlib import Path

from .base import IMAGE_TOKEN, Example
from .jsonio import check_image, field, records

USER, ASSISTANT = ("human", "user"), ("gpt", "assistant")


def load(data: Path, images: Path | None, limit: int | None = None) -> list[Example]:
    out = []
    for rec in records(data)[:limit]:
        convo = field(data, rec, "conversations", list, "a non-empty list of {from, value} turns")
        where = f"{data}: {rec.where}"
        turns = [t for t in convo if not (isinstance(t, dict) and t.get("from") == "system")]
        if not turns:
            raise ValueError(f"{where}: field 'conversations' is empty")
        pairs = []
        for k, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise ValueError(f"{where}: conversations[{k}] is {t!r:.60}; expected {{from, value: string}}")
            want = USER if k % 2 == 0 else ASSISTANT
            if t.get("from") not in want:
                raise ValueError(f"{where}: conversations[{k}].from is {t.get('from')!r}; expected "
                                 f"{' or '.join(want)} (turns alternate, human first)")
            if k % 2:
                pairs[-1][1] = t["value"]
            else:
                pairs.append([t["value"], None])
        if pairs[-1][1] is None:
            raise ValueError(f"{where}: field 'conversations' ends with a human turn; expected an assistant reply")
        marks = [k for k, (u, _) in enumerate(pairs) for _ in range(u.count(IMAGE_TOKEN))]
        if len(marks) > 1 or marks and marks[0] != 0:
            raise ValueError(f"{where}: field 'conversations' has {IMAGE_TOKEN} {len(marks)} time(s), in human "
                             f"turn(s) {sorted(set(marks))}; expected at most once, in the first")
        image, first = None, True
        if "image" in rec:
            name = field(data, rec, "image", str, "a file name relative to the images dir")
            if images is None:
                raise ValueError(f"{where}: field 'image' is {name!r} but the split has no 'images' dir")
            image = check_image(Path(images) / name, where)
            first = not pairs[0][0].rstrip().endswith(IMAGE_TOKEN) or pairs[0][0].strip() == IMAGE_TOKEN
        elif marks:
            raise ValueError(f"{where}: field 'image' is missing, but the conversation has {IMAGE_TOKEN}")
        pairs = [(" ".join(u.replace(IMAGE_TOKEN, " ").split()), a.strip()) for u, a in pairs]
        *history, (prompt, answer) = pairs
        out.append(Example(image, prompt, answer, history=tuple(history), image_first=first))
    return out
