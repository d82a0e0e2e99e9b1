"""Speed and peak memory of rqlm's quantizers against vector-quantize-pytorch: same settings, one run.

    python benchmarks/quantizers.py [--repeats 7] [--threads 1] [--device cpu]

The same as `rqlm bench --quantizers ...`; the benchmark lives in rqlm/benchmarks/quantizers.py.
"""

import sys

from rqlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--quantizers", *sys.argv[1:]]))
