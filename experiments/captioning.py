"""python -m piece_mm.experiments.captioning --model DIR [--baseline DIR] [--data captions.json --images DIR]

Caption metrics (piece_mm.eval.captioning: BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore, SPICE where its jars are) of a
model loaded from an alias, a local dir or a cached HF id, and its retention against a baseline model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from piece_mm.errors import InputError, from_data
    from piece_mm.eval.captioning import CORENLP_ENV, caption_scores
    from piece_mm.eval.clipscore import load_clip
    from piece_mm.eval.generate import generate
    from piece_mm.models import load_model
    from piece_mm.tasks import world
    from piece_mm.tasks.base import load_image
    from piece_mm.tasks.coco import load_coco_captions, load_karpathy

    ap = argparse.ArgumentParser(prog="python -m piece_mm.experiments.captioning",
                                 description="Caption metrics of a model, and its retention against a baseline model.")
    ap.add_argument("--model", required=True, help="alias (llava, qwen2-vl), HF id or local checkpoint dir")
    ap.add_argument("--baseline", help="a second model; prints metric(model) / metric(baseline) per metric")
    ap.add_argument("--data", type=Path, help="COCO-captions JSON ({images, annotations}); default: world held-out")
    ap.add_argument("--images", type=Path, help="image dir for --data")
    ap.add_argument("--format", choices=("coco-captions", "karpathy"), default="coco-captions",
                    help="the layout of --data (karpathy: dataset_coco.json style, its test split)")
    ap.add_argument("--clip-model", help="CLIPScore: an open_clip architecture (with --clip-weights) or a local "
                    "open_clip dir (default: the tiny world CLIP for the world's captions)")
    ap.add_argument("--clip-weights", help="local weights file for --clip-model")
    ap.add_argument("--eval-limit", type=int, default=100, help="number of images to caption")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spice", action="store_true", help=f"also SPICE, if the CoreNLP 3.6.0 jars are found "
                    f"(--corenlp, ${CORENLP_ENV} or pycocoevalcap's spice/lib); else one warning line")
    ap.add_argument("--corenlp", type=Path, help="dir with the CoreNLP jars for --spice")
    args = ap.parse_args(argv)
    try:
        if args.eval_limit < 1:
            raise InputError(f"--eval-limit: {args.eval_limit}; expected a positive integer")
        if args.data:
            if not args.images:
                raise InputError("--images: required with --data")
            load = load_karpathy if args.format == "karpathy" else load_coco_captions
            with from_data():
                examples = load(args.data, args.images, limit=args.eval_limit)
        else:
            examples = world.caption_set(world.HELDOUT_CAPTION_SEED, args.eval_limit, prompt=world.CAPTION_EVAL_PROMPT)
        clip = None
        if args.clip_model or args.clip_weights or not args.data:
            clip = load_clip(args.clip_model, args.clip_weights, device=args.device)
        spice = (args.corenlp or True) if args.spice else False
        results = {}
        for name in [args.model] + ([args.baseline] if args.baseline else []):
            model, processor = load_model(name, device=args.device)
            preds = generate(model, processor, examples, max_new_tokens=24)
            results[name] = caption_scores(preds, [ex.refs for ex in examples], spice=spice)
            if clip is not None:
                with from_data():
                    images = [load_image(ex) for ex in examples]
                results[name].update(clip.score(images, preds, [ex.refs for ex in examples]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in results[args.model]]
    print("metric".ljust(10) + "".join(n[-24:].rjust(26) for n in results)
          + ("retention".rjust(12) if args.baseline else ""))
    for k in keys:
        row = k.ljust(10) + "".join(f"{r[k]:26.4f}" for r in results.values())
        if args.baseline:
            b = results[args.baseline][k]
            row += f"{(results[args.model][k] / b if b else float('nan')):12.4f}"
        print(row)
    return 0




if __name__ == "__main__":
    sys.exit(main())
