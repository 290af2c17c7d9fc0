"""Captioning metrics through pycocoevalcap, general-VQA accuracy and the answer-leak count, on a model it is handed.

The standalone retention check that loads models is experiments/captioning.py:

    python -m piece_mm.experiments.captioning --model llava                       # built-in held-out world captions
    python -m piece_mm.experiments.captioning --model runs/x/model --baseline llava   # + retention per metric
    python -m piece_mm.experiments.captioning --model <dir> --data captions_val.json --images val2014 \
        [--format karpathy] [--clip-model ViT-B-32 --clip-weights <file>] [--spice --corenlp <dir>]
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from piece_mm.tasks.base import Example, exact_match, normalize_answer

METRIC_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


CORENLP_ENV = "PIECE_MM_CORENLP"  # a dir holding the Stanford CoreNLP 3.6.0 jars that SPICE needs
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_spice_warned = False


def corenlp_dir(configured: str | Path | None = None) -> Path | None:
    """The first of: the configured dir, $PIECE_MM_CORENLP, pycocoevalcap's spice/lib, that holds both CoreNLP jars.
    (pycocoevalcap would download them on first use; offline that cannot work, so it is never asked to.)"""
    import pycocoevalcap
    lib = Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"
    for d in (configured, os.environ.get(CORENLP_ENV), lib):
        if d and all((Path(d) / j).is_file() for j in CORENLP_JARS):
            return Path(d)
    return None


def _warn_spice(reason: str) -> None:
    global _spice_warned
    if not _spice_warned:
        from tqdm import tqdm
        tqdm.write(f"warning: SPICE skipped: {reason}", file=sys.stderr)  # not into a progress bar's line
        _spice_warned = True


def spice_score(gts: dict, res: dict, corenlp: Path) -> float:
    """Mean SPICE F-score through pycocoevalcap's SPICE jar, with the CoreNLP jars taken from `corenlp`."""
    import json
    import subprocess

    import pycocoevalcap
    spice_dir = Path(list(pycocoevalcap.__path__)[0]) / "spice"
    classpath = [spice_dir / "spice-1.0.jar", *(Path(corenlp) / j for j in CORENLP_JARS),
                 *sorted((spice_dir / "lib").glob("*.jar"))]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in sorted(gts)]))
        subprocess.run(["java", "-Xmx8G", "-cp", os.pathsep.join(map(str, classpath)), "edu.anu.spice.SpiceScorer",
                        str(inp), "-out", str(out), "-subset", "-silent"], check=True, capture_output=True,
                       timeout=3600)
        scores = [item["scores"]["All"]["f"] for item in json.loads(out.read_text())]
    return float(sum(float(x) for x in scores) / len(scores))


@contextlib.contextmanager
def _quiet():
    """Silence the scorers' chatter (Python prints and the Java tokenizer's stderr); replay it if scoring fails
    (not when it is interrupted: Ctrl-C then ends with one line, not the scorers' logs)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log, contextlib.redirect_stdout(io.StringIO()) as out:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(out.getvalue() + log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_meteor = None  # one METEOR process per Python process: its first score loads paraphrase tables (~7 s), later ones
                # take milliseconds, and a run scores captions after every task


def _meteor_score(gts: dict, res: dict) -> float:
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    for attempt in (0, 1):
        if _meteor is None:
            _meteor = Meteor()
            atexit.register(_close_meteor)
        try:
            return float(_meteor.compute_score(gts, res)[0])
        except Exception:  # the Java process died (or was left in a bad state): start a fresh one, once
            _close_meteor()
            if attempt:
                raise
    raise AssertionError("unreachable")


def _close_meteor() -> None:
    """Stop the METEOR Java process. pycocoevalcap's Meteor takes its lock with a bare acquire() across a whole
    compute_score, so an interrupt (Ctrl-C) in there leaves the lock taken and its close / __del__ would wait on it
    forever: the process is killed here directly, and a fresh lock lets __del__ finish when it runs."""
    global _meteor
    m, _meteor = _meteor, None
    if m is not None:
        with contextlib.suppress(Exception):
            m.lock = threading.Lock()
            m.meteor_p.kill()
            m.meteor_p.wait(timeout=10)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], spice: bool | str | Path = False,
                   ) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of `predictions` against their reference lists.

    SPICE is added when asked (spice=True, or a CoreNLP dir) and the CoreNLP jars are found (corenlp_dir). Otherwise,
    or if SPICE fails, one warning line is printed (once per process) and the other metrics are returned."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one non-empty reference list per prediction; got {len(predictions)} predictions "
                         f"and {len(references)} reference lists")
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": p if p.strip() else "empty"}] for i, p in enumerate(predictions)}
    with _quiet():
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
        out = {}
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)})
        out["METEOR"] = _meteor_score(gts, res)
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice is not False and spice is not None:
        corenlp = corenlp_dir(None if spice is True else spice)
        if corenlp is None:
            _warn_spice(f"no Stanford CoreNLP 3.6.0 jars ({', '.join(CORENLP_JARS)}) found; name their dir with "
                        f"general.corenlp (sequence YAML), --corenlp or ${CORENLP_ENV}"
                        + (f" (looked in {spice})" if spice is not True else ""))
        else:
            try:
                out["SPICE"] = spice_score(gts, res, corenlp)
            except Exception as e:  # SPICE is optional: it must never end an evaluation
                detail = getattr(e, "stderr", b"") or b""
                last = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else []
                _warn_spice(f"{type(e).__name__} running SPICE with {corenlp}" + (f": {last[0][:160]}" if last else ""))
    return out


SHORT_ANSWER = 3  # words: VQA-style answers, the kind that answer_leak looks for in captions


def answer_leak(predictions: Sequence[str], references: Sequence[Sequence[str]], answers) -> dict:
    """How much of a caption's damage is the tasks' own answers leaking into it.

    The leak words are the words of the short task `answers` (at most SHORT_ANSWER words, normalised as for exact
    match; long free-form replies share too much ordinary language with captions to say anything) that no reference
    caption of the whole set uses: a caption that says one has taken it from a task, not from the picture.
    - answer_leak: the share of captions that use a leak word;
    - bare_answer: the share of captions that are nothing but one of those answers (the caption prompt answered as
      if it were a task's question)."""
    norm = {n for n in map(normalize_answer, set(answers)) if 0 < len(n.split()) <= SHORT_ANSWER}
    ref_words = {w for refs in references for r in refs for w in normalize_answer(r).split()}
    leak = {w for a in norm for w in a.split()} - ref_words
    preds = [normalize_answer(p) for p in predictions]
    n = max(1, len(preds))
    return {"answer_leak": sum(any(w in leak for w in p.split()) for p in preds) / n,
            "bare_answer": sum(p in norm for p in preds) / n}


def general_scores(model, processor, captions: Sequence[Example], vqa: Sequence[Example], batch_size: int = 64,
                   progress=None, clip=None, spice=False, caption_max_new_tokens: int = 24,
                   answer_max_new_tokens: int = 8, vqa_unseen: Sequence[bool] = ()) -> tuple[dict, list[str]]:
    """Caption metrics on `captions` (their `refs`), CLIPScore / RefCLIPScore with a `clip` scorer
    (eval/clipscore.py), SPICE as in caption_scores, plus general-VQA exact-match accuracy on `vqa` (and split by
    `vqa_unseen`, one flag per question, when given: split_vqa)."""
    from piece_mm.errors import from_data
    from piece_mm.tasks.base import load_image

    from .generate import generate

    preds = generate(model, processor, captions, batch_size=batch_size, max_new_tokens=caption_max_new_tokens,
                     progress=progress)
    refs = [ex.refs or (ex.answer,) for ex in captions]
    scores = caption_scores(preds, refs, spice=spice)
    if clip is not None:
        with from_data():
            images = [load_image(ex) for ex in captions]
        scores.update(clip.score(images, preds, refs))
    if vqa:
        answers = generate(model, processor, vqa, batch_size=batch_size, max_new_tokens=answer_max_new_tokens,
                           progress=progress)
        correct = [exact_match(a, ex.answer) for a, ex in zip(answers, vqa)]
        scores["VQA"] = sum(correct) / len(vqa)
        if vqa_unseen:
            scores.update(split_vqa(correct, vqa_unseen))
    return scores, preds


PROMPT_KEYS = ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "answer_leak", "bare_answer")  # kept per caption prompt


def prompt_scores(model, processor, captions: Sequence[Example], prompts: Sequence[str], answers=(),
                  batch_size: int = 64, progress=None, caption_max_new_tokens: int = 24) -> dict:
    """{prompt: the caption metrics of `captions` (their images and references) asked under that prompt instead of
    their own, with the leak of the task `answers` into them (answer_leak)}: retention under prompts other than the
    evaluation one."""
    import dataclasses

    from .generate import generate

    refs = [ex.refs or (ex.answer,) for ex in captions]
    out = {}
    for prompt in prompts:
        asked = [dataclasses.replace(ex, prompt=prompt) for ex in captions]
        preds = generate(model, processor, asked, batch_size=batch_size, max_new_tokens=caption_max_new_tokens,
                         progress=progress)
        scores = {**caption_scores(preds, refs), **answer_leak(preds, refs, answers)}
        out[prompt] = {k: scores[k] for k in PROMPT_KEYS}
    return out


def split_vqa(correct: Sequence[bool], unseen: Sequence[bool]) -> dict:
    """General-VQA accuracy over the questions asked in phrasings no method is given (VQA_unseen) and over the
    others (VQA_seen); a side with no question is left out."""
    out = {}
    for key, want in (("VQA_seen", False), ("VQA_unseen", True)):
        picked = [c for c, u in zip(correct, unseen) if bool(u) == want]
        if picked:
            out[key] = sum(picked) / len(picked)
    return out
