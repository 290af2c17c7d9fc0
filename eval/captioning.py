"""Captioning metrics through pycocoevalcap, general-VQA accuracy, and a standalone retention check.

    python -m eval.captioning --model llava                       # built-in held-out world captions
    python -m eval.captioning --model runs/x/model --baseline llava   # + retention per metric
    python -m eval.captioning --model <dir> --data captions_val.json --images val2014
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tasks.base import Example, exact_match

METRIC_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def _spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use; offline they are absent."""
    import pycocoevalcap
    lib = Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"
    return any(p.name.startswith("stanford-corenlp-3.6.0") for p in lib.glob("*.jar"))


@contextlib.contextmanager
def _quiet():
    """Silence the scorers' chatter (Python prints and the Java tokenizer's stderr); replay it if scoring fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log, contextlib.redirect_stdout(io.StringIO()) as out:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(out.getvalue() + log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], spice: bool = False) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of `predictions` against their reference lists.

    SPICE is added only when asked and its CoreNLP models are present (they cannot be fetched offline)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
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
        meteor = Meteor()
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            with contextlib.suppress(Exception):
                meteor.close()
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if spice and _spice_available():
            from pycocoevalcap.spice.spice import Spice
            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def general_scores(model, processor, captions: Sequence[Example], vqa: Sequence[Example], batch_size: int = 64,
                   progress=None) -> tuple[dict, list[str]]:
    """Caption metrics on `captions` (their `refs`) plus general-VQA exact-match accuracy on `vqa`."""
    from eval.generate import generate

    preds = generate(model, processor, captions, batch_size=batch_size, max_new_tokens=24, progress=progress)
    scores = caption_scores(preds, [ex.refs or (ex.answer,) for ex in captions])
    if vqa:
        answers = generate(model, processor, vqa, batch_size=batch_size, max_new_tokens=8, progress=progress)
        scores["VQA"] = sum(exact_match(a, ex.answer) for a, ex in zip(answers, vqa)) / len(vqa)
    return scores, preds


def _load(name: str, device: str):
    from piece_mm.models import load_model  # loading only: eval never imports training code

    model, processor = load_model(name)
    return model.to(device), processor


def main(argv=None) -> int:
    from eval.generate import generate
    from tasks import world
    from tasks.coco import load_coco_captions
    from tasks.errors import InputError

    ap = argparse.ArgumentParser(prog="python -m eval.captioning", description="Caption metrics of a model, and its "
                                 "retention against a baseline model.")
    ap.add_argument("--model", required=True, help="alias (llava, qwen2-vl), HF id or local checkpoint dir")
    ap.add_argument("--baseline", help="a second model; prints metric(model) / metric(baseline) per metric")
    ap.add_argument("--data", type=Path, help="COCO-captions JSON ({images, annotations}); default: world held-out")
    ap.add_argument("--images", type=Path, help="image dir for --data")
    ap.add_argument("--eval-limit", type=int, default=100, help="number of images to caption")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spice", action="store_true", help="also SPICE, if its CoreNLP models are installed")
    args = ap.parse_args(argv)
    try:
        if args.eval_limit < 1:
            raise InputError(f"--eval-limit: {args.eval_limit}; expected a positive integer")
        if args.data:
            if not args.images:
                raise InputError("--images: required with --data")
            examples = load_coco_captions(args.data, args.images, limit=args.eval_limit)
        else:
            examples = world.caption_set(world.HELDOUT_CAPTION_SEED, args.eval_limit, prompt=world.CAPTION_EVAL_PROMPT)
        results = {}
        for name in [args.model] + ([args.baseline] if args.baseline else []):
            model, processor = _load(name, args.device)
            preds = generate(model, processor, examples, max_new_tokens=24)
            results[name] = caption_scores(preds, [ex.refs for ex in examples], spice=args.spice)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in results[args.model]]
    print("metric".ljust(10) + "".join(n[-24:].rjust(26) for n in results) + ("retention".rjust(12) if args.baseline else ""))
    for k in keys:
        row = k.ljust(10) + "".join(f"{r[k]:26.4f}" for r in results.values())
        if args.baseline:
            b = results[args.baseline][k]
            row += f"{(results[args.model][k] / b if b else float('nan')):12.4f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
