#!/usr/bin/env bash
# The token decoder's speed frontier at the Qwen3-0.6B shape (random weights), the rows of docs/results/latent_lm.md:
# its width, layers and a factorised vocabulary head, then codes_then_tokens and codes; each a `rqlm bench` run with
# its own baseline measurement. Run it on an otherwise idle machine.
#   bash scripts/decoder_frontier_bench.sh [OUT]
set -euo pipefail
OUT=${1:-runs/research/frontier}; RQLM=${RQLM:-.venv/bin/rqlm}; mkdir -p "$OUT"
BENCH=(bench --shapes qwen3-0.6b --compression_factors 4 --batch_sizes 1 --large_new_tokens 32 --compile_shapes ""
       --no_memory --repeats 3)
row() {
  local name=$1; shift
  echo "$name (load $(cut -d' ' -f1 /proc/loadavg)): $($RQLM "${BENCH[@]}" "$@" --output_json "$OUT/$name.json" | tail -1)"
}
row tokens-w256-l4 --depth_output tokens --depth_hidden_size 256 --depth_num_layers 4
row tokens-w256-l4-r64 --depth_output tokens --depth_hidden_size 256 --depth_num_layers 4 --token_head_rank 64
row tokens-w512-l4 --depth_output tokens --depth_hidden_size 512 --depth_num_layers 4
row tokens-w1024-l4 --depth_output tokens --depth_hidden_size 1024 --depth_num_layers 4
row tokens-w256-l2 --depth_output tokens --depth_hidden_size 256 --depth_num_layers 2
row tokens-w256-l4-r128 --depth_output tokens --depth_hidden_size 256 --depth_num_layers 4 --token_head_rank 128
row codes_then_tokens-w256-l4 --depth_output codes_then_tokens --depth_hidden_size 256 --depth_num_layers 4
row codes --depth_output codes
