#!/usr/bin/env bash
# SmolLM2-135M-Instruct trained with DPO on its own tested answers (docs/dpo_own_answers.md):
# held-out pass@1 before; sample N answers per practice problem and run their tests (eval --pairs writes a pair
# for a passing and a failing answer); DPO with LoRA on those pairs; held-out and HumanEval pass@1 after.
# HUMANEVAL: the first N HumanEval problems scored before and after (164: all). One thread per process: on a busy
# 2-core machine torch's default two threads made generation ~13x slower (measured).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-8} HUMANEVAL=${HUMANEVAL:-64}
OUT=outputs/dpo_own
MODEL=models/SmolLM2-135M-Instruct
mkdir -p "$OUT/practice_pairs"
run() { /usr/bin/time -f "%e s wall, %M kB peak RSS" "$@"; }
run .venv/bin/mftcoder eval --model "$MODEL" \
    --benchmark mftcoder/assets/problems/practice_heldout.jsonl --batch_size 16 --output "$OUT/heldout-base.jsonl"
# Sampling both sets in one call is how the documented run went; only the practice problems' pairs are trained on.
run .venv/bin/mftcoder eval --model "$MODEL" --benchmark mftcoder/assets/problems/practice.jsonl \
    --benchmark mftcoder/assets/problems/practice_heldout.jsonl --n "$N" --k 1 --temperature 0.8 \
    --max_new_tokens 256 --batch_size 4 --output "$OUT/samples.jsonl" --pairs "$OUT/all_pairs.jsonl"
.venv/bin/python -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; \
open(sys.argv[2], 'w').writelines(json.dumps(r) + '\\n' for r in rows if r['benchmark'] == 'practice')" \
    "$OUT/all_pairs.jsonl" "$OUT/practice_pairs/train.jsonl"
run .venv/bin/mftcoder train configs/smollm2_dpo_own_answers.yaml
ADAPTER=$(ls -d "$OUT"/run/checkpoint-* | sort -t- -k2 -n | tail -1)
run .venv/bin/mftcoder eval --model "$MODEL" --adapter "$ADAPTER" \
    --benchmark mftcoder/assets/problems/practice_heldout.jsonl --batch_size 16 --output "$OUT/heldout-dpo.jsonl"
for side in base dpo; do
    extra=(); [ "$side" = dpo ] && extra=(--adapter "$ADAPTER")
    run .venv/bin/mftcoder eval --model "$MODEL" "${extra[@]}" --benchmark humaneval --limit "$HUMANEVAL" \
        --batch_size 16 --output "$OUT/humaneval$HUMANEVAL-$side.jsonl"
done
