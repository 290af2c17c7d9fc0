#!/usr/bin/env bash
# Regenerates results/ (results/README.md says what each part shows). About 10 h on 2 cores, two runs at a time with
# one thread each; finished runs (metrics.json present) are read back, not rerun, so it continues where it stopped.
# Run dirs go to results/*/runs/ and are not committed.
set -euo pipefail
cd "$(dirname "$0")/.."

# python -m piece_mm.experiments.where on a finished run, when its deltas/ are there: git keeps only a run's
# metrics.json, so in a fresh clone a run read back has none, and the committed record it made is kept as it is
where() {
    local run="$2"
    if [ -d "$run/deltas" ]; then
        python -m piece_mm.experiments.where "$@"
    else
        echo "kept as committed: $run has no deltas/ here (only its metrics.json is in git)"
    fi
}

for m in llava qwen2-vl; do
    # the prompt-conditioning probe of each base, before any tuning
    python -m piece_mm.experiments.probe --model "$m" --output "results/probe-$m.json"
    # the budget x lr grid (configs/sweeps/world.yaml): PIECE-F at 0.1, 0.3, 1 and 3 % of the LLM (keys left out, as
    # in the default budget) x lr 3e-4, 5e-4, 1e-3, and SeqFT at three lrs
    python -m piece_mm.experiments.sweep --model "$m" --jobs 2
    # the same grid with the keys in the pool (configs/budgets/default.yaml's fraction was chosen from it, its comment
    # says how), and with lm_head left out too (at the settings where the tasks are learned)
    python -m piece_mm.experiments.sweep --model "$m" --jobs 2 --grid configs/sweeps/world-keys-in.yaml --output "results/sweep-$m-keys-in"
    python -m piece_mm.experiments.sweep --model "$m" --jobs 2 --grid "configs/sweeps/no-head-$m.yaml" --output "results/sweep-$m-no-head"
    # the previous default budget (1 % at 3e-4, no distillation; results/budgets/previous-default.yaml) with PIECE-F and
    # PIECE-S, and SeqFT, on seeds 0, 1, 2 (lrs: results/lrs-*.json). SeqFT at 3e-4 on seed 0 is the sweep's run with
    # the same flags: copied, not rerun.
    mkdir -p "results/world-$m/runs"
    [ -d "results/world-$m/runs/seqft-lr0.0003-seed0" ] ||
        cp -r "results/sweep-$m/runs/seqft-lr0.0003-s300" "results/world-$m/runs/seqft-lr0.0003-seed0"
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f,piece-s,seqft --seeds 0,1,2 \
        --lr-from "results/lrs-$m.json" --budget results/budgets/previous-default.yaml --eval-limit 100 \
        --output "results/world-$m" --jobs 2
    # the default budget (configs/budgets/default.yaml: 3 % at 2e-3, with distillation and held prompts) with PIECE-F,
    # and SeqFT at 3e-4, on seeds 0, 1, 2 (lrs: results/lrs-default.json), every stage also scored under the unseen
    # prompts (issue 35)
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f,seqft --seeds 0,1,2 \
        --lr-from results/lrs-default.json --eval-limit 100 --output "results/default-$m" --jobs 2
    # the cached term (issue 37) against the exact term it replaced: results/cached-term/exact-<m>.json is
    # results/default-<m>/summary.json as the exact term made it (commit 34083b0; the exact term is the budget with
    # distill.top_k: null and distill.image_positions: true, results/budgets/exact-term.yaml, to rerun it)
    python -m piece_mm.experiments.versus "results/cached-term/exact-$m.json" "results/default-$m/summary.json" \
        --labels exact,cached --output "results/cached-term/$m.md"
    # the same on world-yesno (tasks that share one yes / no answer format)
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f,seqft --seeds 0,1,2 \
        --lr-from results/lrs-default.json --tasks world-yesno --eval-limit 100 --output "results/yesno-$m" --jobs 2
    # the default without held prompts (results/budgets/held/none.yaml), seed 0, on both sequences
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 2.0e-3 --tasks world-yesno \
        --budget results/budgets/held/none.yaml --eval-limit 100 --output "results/held-sweep-$m/none"
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 2.0e-3 \
        --budget results/budgets/held/none.yaml --eval-limit 100 --output "results/held-sweep-$m/none-world"
    # the default budget's distillation over fractions and lrs (configs/sweeps/world-distill.yaml), seed 0
    python -m piece_mm.experiments.sweep --model "$m" --jobs 2 --grid configs/sweeps/world-distill.yaml \
        --output "results/sweep-$m-distill"
    # two baselines the issue compares PIECE-F with, on seed 0, each at its best lr (OP) of 3e-4, 1e-3 and 3e-3
    python -m piece_mm.experiments.compare --model "$m" --methods seqlora,ewc --seeds 0 --lrs 3.0e-4,1.0e-3,3.0e-3 \
        --eval-limit 100 --output "results/baselines-$m" --jobs 2
    # EWC at 3e-4 (its best lr on both) over three seeds; seed 0 is the run above, copied
    mkdir -p "results/ewc-$m/runs"
    [ -d "results/ewc-$m/runs/ewc-lr0.0003-seed0" ] ||
        cp -r "results/baselines-$m/runs/ewc-lr0.0003-seed0" "results/ewc-$m/runs/"
    python -m piece_mm.experiments.compare --model "$m" --methods ewc --seeds 0,1,2 --lrs 3.0e-4 --eval-limit 100 \
        --output "results/ewc-$m" --jobs 2
    # another task order, at the default budget
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 2.0e-3 --tasks world-reversed \
        --eval-limit 100 --output "results/order-$m"
    # the default budget at lr 3e-3 (PIECE-F and PIECE-S, seeds 0, 1, 2) and in the other order (seed 0): it learns more
    # in the default order and, on LLaVA, forgets colour once size is learned after it
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f,piece-s --seeds 0,1,2 --lrs 3.0e-3 \
        --eval-limit 100 --output "results/lr3e-3-$m" --jobs 2
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 3.0e-3 --tasks world-reversed \
        --eval-limit 100 --output "results/order-lr3e-3-$m"
    # where the captions go (results/README.md): the default budget with the LLM's attention keys in the pool (as it
    # was) and with the queries left out too, seed 0
    for b in keys-in no-qk; do
        python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 3.0e-4 --eval-limit 100 \
            --budget "results/budgets/$b.yaml" --output "results/diag-$m-$b"
    done
    # which weights carry the leak, at the previous default (3 % of the LLM, lr 5e-4): without lm_head, without the
    # first layer, or only the first two layers (budgets in results/budgets/; the last also at lr 2e-3)
    for b in nohead nolayer0; do
        python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4 --eval-limit 100 \
            --budget "results/budgets/$b.yaml" --output "results/diag-$m-$b"
    done
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0 --lrs 5.0e-4,2.0e-3 --eval-limit 100 \
        --budget results/budgets/early.yaml --output "results/diag-$m-early"
done
for m in llava qwen2-vl; do
    # the other seven baselines, seed 0, each at three lrs (TRACE, the one sparse method among them, with the budget
    # it ran with: the previous default, without distillation)
    python -m piece_mm.experiments.compare --model "$m" --methods olora,lwf,replay,migu,ln,multitask,trace --seeds 0 \
        --lrs 3.0e-4,1.0e-3,3.0e-3 --budget results/budgets/previous-default.yaml --eval-limit 100 \
        --output "results/others-$m" --jobs 2
    # LwF at 3e-4 (its best lr on both) over three seeds; on Qwen2-VL seed 0 is the run above, copied (on LLaVA it was
    # rerun, and it gave the same numbers)
    if [ "$m" = qwen2-vl ]; then
        mkdir -p "results/lwf-$m/runs"
        [ -d "results/lwf-$m/runs/lwf-lr0.0003-seed0" ] ||
            cp -r "results/others-$m/runs/lwf-lr0.0003-seed0" "results/lwf-$m/runs/"
    fi
    python -m piece_mm.experiments.compare --model "$m" --methods lwf --seeds 0,1,2 --lrs 3.0e-4 --eval-limit 100 \
        --output "results/lwf-$m" --jobs 2
    # every method in one figure and table: each from the comparison with the most seeds (nothing rerun); not
    # results/world-$m, whose PIECE-F and PIECE-S are the previous default budget's
    python -m piece_mm.experiments.frontier --output "results/methods-$m" \
        --title "$m: every method at its chosen lr (default sequence)" \
        --summaries "results/default-$m/summary.json,results/baselines-$m/summary.json,results/ewc-$m/summary.json,results/others-$m/summary.json,results/lwf-$m/summary.json"
done
# the keys-in runs taken apart: which layer and kind of weight changes the captions
where --run results/diag-llava-keys-in/runs/piece-f-lr0.0003-seed0 --task 1 \
    --output results/where-llava-previous-size.json
where --run results/diag-qwen2-vl-keys-in/runs/piece-f-lr0.0003-seed0 --task 3 \
    --output results/where-qwen2-vl-previous-location.json
# where the damage lives at two sweep settings that learn the tasks (keys out): LLaVA's colour task at 0.3 %, lr 1e-3,
# and Qwen2-VL's count task at 0.1 %, lr 1e-3
where --run results/sweep-llava/runs/piece-f-llm0.003-proj0-vis0-lr0.001-s300 --task 2 \
    --output results/where-llava-sweep-0.3pc-lr1e-3-color.json
where --run results/sweep-qwen2-vl/runs/piece-f-llm0.001-proj0-vis0-lr0.001-s300 --task 4 \
    --output results/where-qwen2-vl-sweep-0.1pc-lr1e-3-count.json
# what was tried for the held prompts (issue 35), seed 0 on world-yesno, every stage scored in full (no eval-limit).
# w1-bank1, w1-bank1-noanswers, w1-bank2-noanswers and w1-bank2 ran at commit 72a5c49 (the earlier tasks' prompts
# cycled with the bank's); rerun here they take this code's pool (earlier_share).
for b in w1-bank1 w1-bank1-noanswers w1-bank2-noanswers w1-bank2 w1-bank2-share w3-bank2-share; do
    python -m piece_mm.experiments.compare --model llava --methods piece-f --seeds 0 --lrs 2.0e-3 --tasks world-yesno \
        --budget "results/budgets/held/$b.yaml" --output "results/held-sweep-llava/$b"
done
for b in w1-bank2 w1-bank2-share; do
    python -m piece_mm.experiments.compare --model qwen2-vl --methods piece-f --seeds 0 --lrs 2.0e-3 --tasks world-yesno \
        --budget "results/budgets/held/$b.yaml" --output "results/held-sweep-qwen2-vl/$b"
done
# held.protect on the first task alone (results/held-sweep-llava/big-only.yaml), against the same without it
for b in w1-generic-share-protect3 w1-generic-share; do
    python -m piece_mm.experiments.compare --model llava --methods piece-f --seeds 0 --lrs 2.0e-3 \
        --tasks results/held-sweep-llava/big-only.yaml --budget "results/budgets/held/$b.yaml" \
        --output "results/held-sweep-llava/big-$b"
done
# the budget policies at equal totals (issue 22): global pool, LLM only, LLM + projector, proportional and pool: auto,
# at 0.1 / 0.3 / 1 / 3 % of every scorable weight, on both models; 100 steps of 8 examples per task, eval-limit 40
python -m piece_mm.experiments.policies --jobs 2 --output results/policies
# the default budget with pool: auto (configs/budgets/auto.yaml) at the default's own settings, three seeds
for m in llava qwen2-vl; do
    python -m piece_mm.experiments.compare --model "$m" --methods piece-f --seeds 0,1,2 --lrs 2.0e-3 --budget auto \
        --eval-limit 100 --output "results/auto-$m" --jobs 2
done
# issue 36: the comparison in the paper's setting. The shared-format sequence (configs/sequences/world-shared.yaml) and
# world-yesno, every arm under one lr rule with bracketed grids (experiments/study.py; configs/studies/*.yaml say
# what each arm is): the default method and its controls (PIECE-S, random and magnitude masks of the same k, PIECE-F
# without the regulariser, the regulariser with full fine-tuning), the fair baselines (SeqFT, LwF from its first
# task, EWC with a lambda grid, LwF with a weight grid, SeqLoRA; SeqFT, LwF and SeqLoRA also with PIECE's
# exclusions) and multitask; seeds 0, 1, 2; 300 steps of 16 per task, eval-limit 100
for m in llava qwen2-vl; do
    python -m piece_mm.experiments.study configs/studies/shared.yaml --model "$m" --jobs 2  # its multitask, piece-f, piece-s,
    # random, magnitude and piece-f-no-reg seed-0 runs are the ones in results/shared-interim
    python -m piece_mm.experiments.study configs/studies/shared-orders.yaml --model "$m" --jobs 2
    python -m piece_mm.experiments.study configs/studies/yesno-baselines.yaml --model "$m" --jobs 2
    # the arms whose runs were lost between sessions (run directories were not kept in git then), rerun into the
    # same runs directory: multitask, LwF and LwF-x (weight 9 tried, three seeds), and on LLaVA full fine-tuning with
    # the term; a whole rerun of the study above makes these its own rows, and this line reads them back
    python -m piece_mm.experiments.study configs/studies/shared.yaml --model "$m" --jobs 1 \
        --arms "$([ "$m" = llava ] && echo multitask,full-ft-reg,lwf-x,lwf || echo multitask,lwf,lwf-x)" \
        --output "results/shared-more-$m"
    # each sequence's frontier: every arm at its choice, and which arms dominate which (nothing rerun)
    python -m piece_mm.experiments.frontier \
        --summaries "results/shared-more-$m/summary.json,results/shared-$m/summary.json" \
        --output "results/frontier-shared-$m" --title "$m, world-shared: every arm at its chosen lr"
    python -m piece_mm.experiments.frontier --summaries "results/yesno-baselines-$m/summary.json" \
        --output "results/frontier-yesno-$m" --title "$m, world-yesno: every arm at its chosen lr"
done
# the budget policies on the shared-format sequence: where the global pool puts its weights task by task, and global
# and auto against llm-only at an equal total (3 % of every scorable weight), at the default's lr, steps and examples
# scored (one lr, seed 0: six runs, to fit the study's 8 h)
python -m piece_mm.experiments.policies --tasks world-shared --policies global,llm,auto --totals 0.03 \
    --choose-at 0.03 --seeded 0.03 --seeds 0 --lrs 2.0e-3 --steps 300 --batch-size 16 --eval-limit 100 \
    --score-examples 1000 --jobs 2 --output results/policies-shared
# world-shared's tasks, four test examples each (results/README.md, "The shared-format sequence")
python -m piece_mm.experiments.sheet --tasks world-shared --output results/shared-interim/tasks.png
# what was tried on the default budget there (seed 0, LLaVA; the default and 10 % on Qwen2-VL too): the budgets are in
# results/budgets/shared/; each run's metrics.json is copied into results/shared-interim/
# (pool auto is configs/budgets/auto.yaml, the default with pool: auto)
[ -f results/shared-probes/runs/llava-auto/metrics.json ] ||
    python -m piece_mm.train --model llava --tasks world-shared --budget auto --eval-limit 100 \
        --output results/shared-probes/runs/llava-auto
for b in no-answers held-w1 llm10 keep-earlier llm10-keep-earlier; do
    [ -f "results/shared-probes/runs/llava-$b/metrics.json" ] ||
        python -m piece_mm.train --model llava --tasks world-shared --budget "results/budgets/shared/$b.yaml" \
            --eval-limit 100 --output "results/shared-probes/runs/llava-$b"
done
[ -f results/shared-probes/runs/qwen2-vl-llm10/metrics.json ] ||
    python -m piece_mm.train --model qwen2-vl --tasks world-shared --budget results/budgets/shared/llm10.yaml \
        --eval-limit 100 --output results/shared-probes/runs/qwen2-vl-llm10
for b in no-earlier earlier-form crops; do  # the held rows: no earlier prompts; those answered in form; crops
    [ -f "results/shared-probes/runs/llava-$b/metrics.json" ] ||
        python -m piece_mm.train --model llava --tasks world-shared --budget "results/budgets/shared/$b.yaml" \
            --eval-limit 100 --output "results/shared-probes/runs/llava-$b"
done
for b in keep-earlier earlier-0.8; do
    [ -f "results/shared-probes/runs/llava-$b-lr6e-3/metrics.json" ] ||
        python -m piece_mm.train --model llava --tasks world-shared --budget "results/budgets/shared/$b.yaml" --lr 6e-3 \
            --eval-limit 100 --output "results/shared-probes/runs/llava-$b-lr6e-3"
done
[ -f results/shared-probes/runs/llava-llm10-keep-earlier-lr1e-3/metrics.json ] ||
    python -m piece_mm.train --model llava --tasks world-shared --budget results/budgets/shared/llm10-keep-earlier.yaml \
        --lr 1e-3 --eval-limit 100 --output results/shared-probes/runs/llava-llm10-keep-earlier-lr1e-3
# the reversed order with every stage scored, and the bank's prompts held by the base (distill.held.bank_teacher:
# base, results/budgets/shared/bank-base.yaml) in that order (LLaVA) and in the file's (both), seed 0; the two
# reversed runs taken apart stage by stage (results/README.md, "Four orders")
[ -f results/shared-probes/runs/llava-reverse/metrics.json ] ||
    python -m piece_mm.train --model llava --tasks world-shared@reverse --eval-limit 100 --eval-general every \
        --output results/shared-probes/runs/llava-reverse
[ -f results/shared-probes/runs/llava-reverse-bank-base/metrics.json ] ||
    python -m piece_mm.train --model llava --tasks world-shared@reverse --budget results/budgets/shared/bank-base.yaml \
        --eval-limit 100 --eval-general every --output results/shared-probes/runs/llava-reverse-bank-base
for m in llava qwen2-vl; do
    [ -f "results/shared-probes/runs/$m-bank-base/metrics.json" ] ||
        python -m piece_mm.train --model "$m" --tasks world-shared --budget results/budgets/shared/bank-base.yaml \
            --eval-limit 100 --output "results/shared-probes/runs/$m-bank-base"
done
# and the default without holding the bank prompts the model answers as it answers the task's own
# (distill.held.paraphrases: 0.8, results/budgets/shared/paraphrases.yaml), LLaVA, seed 0
[ -f results/shared-probes/runs/llava-paraphrases/metrics.json ] ||
    python -m piece_mm.train --model llava --tasks world-shared --budget results/budgets/shared/paraphrases.yaml \
        --eval-limit 100 --output results/shared-probes/runs/llava-paraphrases
for r in llava-reverse llava-reverse-bank-base; do
    where --run "results/shared-probes/runs/$r" --stages --output "results/where-shared-$r-stages.json"
done
# the default at lr 6e-3 is the study's piece-f-lr0.006-seed0 (PIECE-F's lr grid), and the default's seed-0 runs on
# both models are the study's piece-f-lr0.002-seed0
