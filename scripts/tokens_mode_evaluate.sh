#!/usr/bin/env bash
# The table's figures for one protocol row (see scripts/tokens_mode_protocol.sh): held-out perplexity against the
# baseline on the same tokens, judged quality of temperature-1 samples with distinct-n, BrierLM.
#   bash scripts/tokens_mode_evaluate.sh ROW_DIR [OUT]      PROMPTS=128: more judged prompts (evaluation-128.json)
set -euo pipefail
ROW=$1; OUT=${2:-runs/research}; RQLM=${RQLM:-.venv/bin/rqlm}; PROMPTS=${PROMPTS:-32}
JSON="$ROW/evaluation.json"; [ "$PROMPTS" = 32 ] || JSON="$ROW/evaluation-$PROMPTS.json"
$RQLM evaluate --model "$ROW" --baseline "$OUT/baseline-s0" --block_size 128 --batch_size 16 \
  --num_prompts "$PROMPTS" --prompt_tokens 32 --new_tokens 64 --temperature 1.0 --top_k 0 --top_p 1.0 --seed 0 \
  --brier_prefixes 256 --output_json "$JSON"
