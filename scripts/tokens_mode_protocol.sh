#!/usr/bin/env bash
# The accuracy protocol of docs/results/latent_lm.md: every row trained on the same blocks of the embedded corpus
# for the same number of tokens (STEPS x 16 blocks x 128 tokens), with the same optimizer settings, from scratch.
#   bash scripts/tokens_mode_protocol.sh ROW [OUT]   ROW: tokenizer | vae | baseline | a train-lm row below
set -euo pipefail
ROW=$1; OUT=${2:-runs/research}; STEPS=${STEPS:-600}; SEED=${SEED:-0}
RQLM=${RQLM:-.venv/bin/rqlm}
COMMON=(--block_size 128 --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --learning_rate 1e-3
        --warmup_steps 50 --lr_scheduler cosine --max_steps "$STEPS" --max_minutes none --eval_steps 100
        --eval_batches 21 --save_steps 200 --logging_steps 20 --mixed_precision no --seed "$SEED")
VAE=${VAE:-$OUT/vae}; VAE_NAME=$(basename "$VAE")
LM=(train-lm --vae "$VAE" --backbone tiny "${COMMON[@]}")
# The code path's levers: every VAE trains the same 640 steps (the reference VAE above stopped at 624 on a time budget).
VAE640=(train-vae --tokenizer "$OUT/tokenizer" --backbone tiny --block_size 128 --max_steps 640 --max_minutes none
        --eval_steps 320 --save_steps 320 --logging_steps 40 --seed "$SEED")
KW='"kmeans_init": true, "threshold_ema_dead_code": 2, "decay": 0.8, "commitment_weight": 0.25'
TOKENS=(--depth_output tokens --depth_hidden_size 256 --depth_num_attention_heads 4)
case $ROW in
  tokenizer) $RQLM train-tokenizer --vocab_size 8192 --output_dir "$OUT/tokenizer" ;;
  vae) $RQLM train-vae --tokenizer "$OUT/tokenizer" --backbone tiny --output_dir "$OUT/vae" --block_size 128 \
         --max_steps 1500 --max_minutes none --eval_steps 500 --save_steps 500 --logging_steps 100 ;;
  baseline) $RQLM train-baseline --tokenizer "$OUT/tokenizer" --backbone tiny --output_dir "$OUT/baseline-s$SEED" "${COMMON[@]}" ;;
  vae640) $RQLM "${VAE640[@]}" --output_dir "$OUT/vae640" ;;
  vae640-qdrop) $RQLM "${VAE640[@]}" --quantizer_kwargs "{$KW, \"quantize_dropout\": true}" --output_dir "$OUT/$ROW" ;;
  vae640-d2k4096) $RQLM "${VAE640[@]}" --num_quantizers 2 --codebook_size 4096 --output_dir "$OUT/$ROW" ;;
  draft-head) $RQLM train-draft-head --target "$OUT/baseline-s0" --vae "$VAE" --block_size 128 --max_steps "$STEPS" \
                --max_minutes none --eval_steps 200 --save_steps 200 --logging_steps 20 --seed "$SEED" --output_dir "$OUT/draft-head-s$SEED" ;;
  vae640-semantic) $RQLM "${VAE640[@]}" --semantic_teacher "$OUT/baseline-s0" --semantic_weight 1 --output_dir "$OUT/$ROW" ;;
  # joint rate-distortion: 320 more steps from the reference VAE under its codes LM's rate (temperature 4: the
  # residuals' nearest and second-nearest codes lie 1.4-14 apart in squared distance), against 320 more without
  vae640-rd) $RQLM "${VAE640[@]}" --max_steps 320 --init_from "$OUT/vae640" --rate_prior "$OUT/codes-vae640-s0" \
               --rate_weight 0.1 --rate_temperature 4 --output_dir "$OUT/$ROW" ;;
  vae640-more) $RQLM "${VAE640[@]}" --max_steps 320 --init_from "$OUT/vae640" --output_dir "$OUT/$ROW" ;;
  codes) $RQLM "${LM[@]}" --depth_output codes --output_dir "$OUT/codes-$VAE_NAME-s$SEED" ;;
  ctt-emb-4l-ctx4) $RQLM "${LM[@]}" --depth_output codes_then_tokens --depth_hidden_size 256 --depth_num_attention_heads 4 \
                   --depth_num_layers 4 --token_decoder_context 4 --spatial_input token_embeddings --output_dir "$OUT/$ROW-$VAE_NAME-s$SEED" ;;
  tokens-emb-4l) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --spatial_input token_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-emb-4l-ctx4) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --token_decoder_context 4 --spatial_input token_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-emb-4l-ctx4-r64) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --token_decoder_context 4 --token_head_rank 64 --spatial_input token_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-emb-4l-ctx8) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --token_decoder_context 8 --spatial_input token_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-emb-2l) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 2 --spatial_input token_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-sum-4l) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --spatial_input token_and_code_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  tokens-codes-4l) $RQLM "${LM[@]}" "${TOKENS[@]}" --depth_num_layers 4 --spatial_input code_embeddings --output_dir "$OUT/$ROW-s$SEED" ;;
  *) echo "unknown row $ROW" >&2; exit 2 ;;
esac
