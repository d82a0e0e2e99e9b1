"""Generation tokens/s of the RQ model against the Qwen3 baseline: the Qwen3-0.6B shape and the demo's tiny shape.

    OMP_NUM_THREADS=2 python benchmarks/generation.py --output_json docs/generation_speed.json \
        --plot docs/generation_speed.png

The same as `rqlm bench ...` (generation is its default mode); the benchmark lives in
rqlm/benchmarks/generation_speed.py.
"""

import sys

from rqlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
