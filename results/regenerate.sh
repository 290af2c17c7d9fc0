#!/usr/bin/env bash
# Regenerates results/ (results/README.md says what each part shows). About 2 h on 2 cores, two runs at a time with
# one thread each; finished runs (metrics.json present) are read back, not rerun, so it continues where it stopped.
# Run dirs go to results/*/runs/ and are not committed.
set -euo pipefail
cd "$(dirname "$0")/.."

for m in llava qwen2-vl; do
    # the prompt-conditioning probe of each base, before any tuning
    python -m eval.probe --model "$m" --output "results/probe-$m.json"
    # the default budget's lr: PIECE-F on seed 0 at 5e-4 and 1e-3 (the better retention at the same OP: 5e-4)
    python -m eval.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4,1.0e-3 --eval-limit 100 \
        --output "results/world-$m"
    # PIECE-F (the default run), PIECE-S and SeqFT on seed 0, each at its lr in results/lrs-<model>.json, then PIECE-F
    # on seeds 1 and 2 (PIECE-S and SeqFT on three seeds: --seeds 0,1,2 here; not run yet, see results/README.md)
    python -m eval.compare --model "$m" --methods piece-f --seeds 0,1,2 --lrs 5.0e-4 --eval-limit 100 \
        --output "results/world-$m"
    python -m eval.compare --model "$m" --methods piece-f,piece-s,seqft --seeds 0 \
        --lr-from "results/lrs-$m.json" --eval-limit 100 --output "results/world-$m"
    # PIECE-F's three seeds on their own (the same run dirs, copied)
    mkdir -p "results/default-$m/runs"
    cp -r "results/world-$m"/runs/piece-f-lr0.0005-seed* "results/default-$m/runs/"
    python -m eval.compare --model "$m" --methods piece-f --seeds 0,1,2 --lrs 5.0e-4 --eval-limit 100 \
        --output "results/default-$m"
    # another task order
    python -m eval.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4 --tasks world-reversed \
        --eval-limit 100 --output "results/order-$m"
    # which weights carry the leak: the same 3 % of the LLM without lm_head, without the first layer, or only the
    # first two layers (budgets in results/budgets/; the last also at lr 2e-3)
    for b in nohead nolayer0; do
        python -m eval.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4 --eval-limit 100 \
            --budget "results/budgets/$b.yaml" --output "results/diag-$m-$b"
    done
    python -m eval.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4,2.0e-3 --eval-limit 100 \
        --budget results/budgets/early.yaml --output "results/diag-$m-early"
done
