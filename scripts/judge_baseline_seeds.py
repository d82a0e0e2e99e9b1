"""The judged figure's floor: a second baseline seed's temperature-1 samples, judged by the first baseline, with the
same prompts and settings as scripts/tokens_mode_evaluate.sh (PROMPTS=128). A model as good as the baseline but not
the judge itself scores here, not at the judge's own figure.
    python scripts/judge_baseline_seeds.py [OUT]
"""

import json
import sys
from argparse import Namespace

from transformers import AutoModelForCausalLM, AutoTokenizer

from rqlm.commands.evaluate import judged_figures
from rqlm.data.loading import get_lm_datasets

out = sys.argv[1] if len(sys.argv) > 1 else "runs/research"
tokenizer = AutoTokenizer.from_pretrained(f"{out}/baseline-s0")
_, blocks = get_lm_datasets(None, tokenizer, block_size=128, compression_factor=4)
judge, other = (AutoModelForCausalLM.from_pretrained(f"{out}/baseline-s{s}").eval() for s in (0, 1))
args = Namespace(num_prompts=128, prompt_tokens=32, new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 batch_size=16)
figures = judged_figures(other, judge, blocks, args, tokenizer)
print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))
