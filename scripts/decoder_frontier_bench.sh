#!/usr/bin/env bash
# The tokens mode's speed frontier at the Qwen3-0.6B shape (random weights): the token decoder's width and layers
# (and, with RANKS, a factorised vocabulary head), each a `rqlm bench` run with its own baseline measurement.
#   bash scripts/decoder_frontier_bench.sh [OUT]     WIDTHS="256 512 1024" LAYERS="2 4" RANKS="" (e.g. "64 128")
set -euo pipefail
OUT=${1:-runs/research/frontier}; RQLM=${RQLM:-.venv/bin/rqlm}; mkdir -p "$OUT"
BENCH=(bench --shapes qwen3-0.6b --depth_output tokens --compression_factors 4 --batch_sizes 1 --large_new_tokens 32
       --compile_shapes "" --no_memory --repeats 3)
for width in ${WIDTHS:-256 512 1024}; do
  for layers in ${LAYERS:-2 4}; do
    $RQLM "${BENCH[@]}" --depth_hidden_size "$width" --depth_num_layers "$layers" \
      --output_json "$OUT/w$width-l$layers.json" | tail -1
  done
done
for rank in ${RANKS:-}; do
  $RQLM "${BENCH[@]}" --depth_hidden_size 256 --depth_num_layers 4 --token_head_rank "$rank" \
    --output_json "$OUT/w256-l4-r$rank.json" | tail -1
done
