"""`rqlm serve`'s page: the baseline, each latent LM and the drafted baseline race on one prompt in a browser.

- `lineup.py`: which folders race (default: `make demo`'s runs/demo), checked, then loaded once;
- `race.py`: the race itself, one column after another, streamed and timed as `rqlm bench` times;
- `last_run.py`: the last finished race kept as JSON, the page's static view;
- `page.py`: the Gradio Blocks over them (gradio is imported only there).
"""

from .lineup import Contender, Lineup, Loaded, demo_lineup, load_lineup
from .race import MAX_NEW_TOKENS, Column, Settings, check_request, identical, run_race

__all__ = ["MAX_NEW_TOKENS", "Column", "Contender", "Lineup", "Loaded", "Settings", "check_request", "demo_lineup",
           "identical", "load_lineup", "run_race"]
