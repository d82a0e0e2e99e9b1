"""Speed and memory measured against the baseline in one run (`rqlm bench`, `rqlm plan`).

- `generation_speed`: RQ models against the plain Qwen3 baseline, per shape, batch and C, built from
  `generation_models` (the random-weight models, prompts, KV-cache sizes), timed with `generation_parts`
  (first-token clock, the RQ model's per-step part timers), shown by `generation_tables`, and swept over
  context length and batch size by `generation_sweep`;
- `speed`: timing and peak-memory helpers, and the model-level benchmark;
- `quantizers`: rqlm's quantizers against vector-quantize-pytorch;
- `memory_plan`: memory per GPU to train around a Qwen3 size, computed offline.
"""

HEADLINE_C = 4  # the compression factor of the headline figures (`rqlm bench`, the demo's report)
