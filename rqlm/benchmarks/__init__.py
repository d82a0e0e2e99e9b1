"""Speed and memory measured against the baseline in one run (`rqlm bench`, `rqlm plan`).

- `generation_speed`: RQ models against the plain Qwen3 baseline, per shape, batch and C;
- `speed`: timing and peak-memory helpers, and the model-level benchmark;
- `quantizers`: rqlm's quantizers against vector-quantize-pytorch;
- `memory_plan`: memory per GPU to train around a Qwen3 size, computed offline.
"""

HEADLINE_C = 4  # the compression factor of the headline figures (`rqlm bench`, the demo's report)
