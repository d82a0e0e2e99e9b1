"""The Gradio page: one prompt, a column per contender streaming its tokens, live speeds, the last run's static view.

Each browser session's race is its own generator behind Gradio's queue; one race runs at a time
(`concurrency_limit=1`), so a second session waits its turn and every speed is measured alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page calls nothing outside the machine

from .last_run import last_run_markdown, load_last_run, save_last_run
from .lineup import Loaded
from .race import MAX_NEW_TOKENS, Column, Settings, identical, run_race

INTRO = """# rqlm: the baseline against the residual-quantized latent LMs
One prompt, every model in turn: the Qwen3 baseline alone, each RQ model (C tokens per step), and the baseline
verified by a drafter (lossless: under greedy decoding it must make exactly the baseline's text).
**The columns run one after another, not at once, so that each speed is measured alone on the machine.**"""

SAME = "<div id='identical-marker' class='same'>✔ drafted text identical to the baseline's</div>"
DIFFERENT = ("<div id='identical-marker' class='different' style='background:#c00;color:#fff;font-weight:bold;"
             "font-size:1.3em;padding:0.5em'>✘ BUG: the drafted text differs from the baseline's</div>")
NOT_COMPARED = "<div id='identical-marker' class='not-compared'>{why}</div>"
CSS = "#identical-marker.same {background:#dfd; padding:0.5em; font-weight:bold}"


def stats_line(column: Column) -> str:
    """A column's live figures: tokens so far, tokens/s, time to first token, and acceptance when drafting."""
    if column.error:
        return f"**error:** {column.error}"
    if not column.new_tokens and not column.done:
        return "waiting" if not column.seconds else "running…"
    first = "–" if column.first_token_seconds is None else f"{1000 * column.first_token_seconds:,.1f} ms"
    parts = [f"{column.new_tokens} tokens", f"{column.tokens_per_second:,.1f} tokens/s", f"first token {first}"]
    if column.drafted:
        parts.append("acceptance " + ("–" if column.acceptance is None else f"{column.acceptance:.2f} tokens/step"))
    return " · ".join(parts) + (" · done" if column.done else "")


def marker_html(columns: list[Column], settings: Settings) -> str:
    """The drafting column's identity with the baseline's, loud when it differs."""
    if not any(c.drafted for c in columns):
        return NOT_COMPARED.format(why="no drafting column")
    if settings.do_sample:
        return NOT_COMPARED.format(why="sampling: the drafted text is a sample of the baseline's distribution, "
                                        "not the same text; identity is checked under greedy decoding")
    verdict = identical(columns, settings)
    if verdict is None:
        return NOT_COMPARED.format(why="drafted text: compared once the drafting column finishes")
    return SAME if verdict else DIFFERENT


def race_updates(loaded: Loaded, prompt, max_new_tokens, decoding, temperature, top_k, seed, kernels=True):
    """The page's race handler: yields (status, message, marker, last run, *texts, *stats) after each reading."""
    n = len(loaded.contenders)
    settings = Settings(max_new_tokens, decoding == "sampling", temperature, top_k, seed)
    blank = [Column(c.name, drafted=c.drafted) for c in loaded.contenders]
    last = last_run_markdown(load_last_run(loaded.lineup.last_run_path))

    def updates(status, message, columns, marker=""):
        return (status, message, marker, last, *(c.text for c in columns), *(stats_line(c) for c in columns))

    columns, shown = blank, None
    try:
        for columns in run_race(loaded, prompt, settings, kernels):
            running = next((i for i, c in enumerate(columns) if not c.done), None)
            status = f"running column {running + 1} of {n}: {columns[running].name}" if running is not None else ""
            now = updates(status, "", columns, marker_html(columns, settings))
            yield now if shown is None else tuple(_unchanged(a, b) for a, b in zip(now, shown))
            shown = now
    except ValueError as e:  # bad input: a message on the page, the columns left empty
        yield updates("not started", f"**Cannot race:** {e}", blank, "")
        return
    except Exception as e:  # noqa: BLE001  (never a traceback on the page)
        yield updates("stopped", f"**The race stopped:** {type(e).__name__}: {e}", columns, "")
        return
    try:
        save_last_run(loaded.lineup.last_run_path, prompt, settings, columns)
        last = last_run_markdown(load_last_run(loaded.lineup.last_run_path))
        note = ""
    except OSError as e:
        note = f"(the last run could not be kept: {e})"
    yield updates(f"finished: all {n} columns", note, columns, marker_html(columns, settings))


def _unchanged(value, before):
    """`value`, or gr.skip() where the page already shows it: less for the server and the browser to redo mid-race."""
    import gradio as gr

    return gr.skip() if value == before else value


def build_page(loaded: Loaded, kernels: bool = True):
    """The gr.Blocks of the race over `loaded`'s contenders (queue it and launch it: `launch_page`)."""
    import gradio as gr

    with gr.Blocks(title="rqlm: latent LM race") as page:
        gr.Markdown(INTRO)
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="Text for every model to continue")
        with gr.Row():
            max_new_tokens = gr.Number(64, label=f"Max new tokens (1-{MAX_NEW_TOKENS})", precision=0, elem_id="max-new-tokens")
            decoding = gr.Radio(["greedy", "sampling"], value="greedy", label="Decoding", elem_id="decoding")
            temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
            top_k = gr.Number(0, label="Top-k (sampling; 0: all)", precision=0)
            seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
        start = gr.Button("Race", variant="primary", elem_id="race")
        status = gr.Markdown("", elem_id="status")
        message = gr.Markdown("", elem_id="message")
        marker = gr.HTML("", elem_id="marker")
        texts, stats = [], []
        with gr.Row():
            for i, contender in enumerate(loaded.contenders):
                with gr.Column():
                    texts.append(gr.Textbox(label=contender.name, lines=12, interactive=False, elem_id=f"column-{i}"))
                    stats.append(gr.Markdown("waiting", elem_id=f"stats-{i}"))
        with gr.Accordion("Last run (static view: its text and speeds, kept on disk)", open=True):
            last = gr.Markdown(elem_id="last-run")

        def run(*inputs):
            yield from race_updates(loaded, *inputs, kernels=kernels)

        start.click(run, [prompt, max_new_tokens, decoding, temperature, top_k, seed],
                    [status, message, marker, last, *texts, *stats], concurrency_limit=1,
                    show_progress="hidden")  # no spinner or timer redrawn in the browser while a column runs
        page.load(lambda: last_run_markdown(load_last_run(loaded.lineup.last_run_path)), None, last)
    return page


def launch_page(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Queue the page's events (each session its own stream, one race at a time) and serve it."""
    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS, quiet=not block)
