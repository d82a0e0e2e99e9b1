"""The page a Hugging Face Space runs: `rqlm serve` on `make demo`'s models (runs/demo), on the Space's port."""

import os

from rqlm.serve import demo_lineup, load_lineup
from rqlm.serve.page import build_page, launch_page

if __name__ == "__main__":
    try:
        loaded = load_lineup(demo_lineup())
    except (ValueError, FileNotFoundError) as e:  # one line, as `rqlm serve` says it
        raise SystemExit(f"app.py: error: {e}") from None
    launch_page(build_page(loaded), host="0.0.0.0", port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
