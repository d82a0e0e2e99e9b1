"""`rqlm serve`'s race without a browser (rqlm/serve/), on the shared `rqlm demo --quick` models.

Covers: the race streams each column in turn (a column's text grows over several updates, the next starts only
when it is done); the drafted column's greedy text is the baseline's and the marker says so (and loudly when
not); bad input (empty or too long a prompt, max new tokens 0 or over the limit) is a message, never an
exception; bad folders (missing, a VAE as --model, no runs/demo) are one-line errors of `rqlm serve`; the last
run is written to and read back from runs/demo/serve_last_run.json; two clients of one page each get their own
race through Gradio's queue.
"""

from __future__ import annotations

import json
import socket

import pytest

from rqlm import cli
from rqlm.serve import MAX_NEW_TOKENS, Settings, demo_lineup, identical, load_lineup, run_race
from rqlm.serve.page import DIFFERENT, SAME, marker_html, race_updates

PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def loaded(demo):
    """The demo's four columns: baseline, lm (tokens mode), lm_codes (codes mode), baseline drafted by lm."""
    return load_lineup(demo_lineup(demo))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_lineup_has_the_baseline_each_rq_model_and_the_drafted_baseline(loaded, demo):
    names = [c.name for c in loaded.contenders]
    assert names == ["baseline: baseline (qwen3)", "lm (RQ, tokens mode, C=4)", "lm_codes (RQ, codes mode, C=4)",
                     "baseline drafted by lm (RQ, tokens mode, C=4)"]
    assert [c.drafted for c in loaded.contenders] == [False, False, False, True]
    assert loaded.contenders[-1].assisted and loaded.contenders[-1].model is loaded.contenders[0].model
    assert loaded.lineup.last_run_path == demo.absolute() / "serve_last_run.json"


def test_race_streams_one_column_after_another(loaded, monkeypatch):
    import rqlm.serve.race

    monkeypatch.setattr(rqlm.serve.race, "UPDATE_SECONDS", 0.002)  # many readings, even of the tiny models
    states = []
    for columns in run_race(loaded, PROMPT, Settings(max_new_tokens=48)):
        states.append([(c.new_tokens, c.done, c.text) for c in columns])
    for state in states:  # a column starts only once every column before it is done
        started = [tokens > 0 or done for tokens, done, _ in state]
        done = [d for _, d, _ in state]
        assert all(done[:i] == [True] * i for i, s in enumerate(started) if s)
    for i in range(len(loaded.contenders)):
        counts = [state[i][0] for state in states]
        assert counts == sorted(counts) and counts[-1] == 48  # grows, never shrinks, to all of it
        assert len({c for c in counts if 0 < c < 48}) >= 1, f"column {i} was never seen mid-way"
    assert all(done for _, done, _ in states[-1])


def test_drafted_greedy_text_is_the_baselines_and_the_marker_says_so(loaded):
    settings = Settings(max_new_tokens=32)
    *_, columns = run_race(loaded, PROMPT, settings)
    assert columns[-1].ids == columns[0].ids and columns[-1].text == columns[0].text and len(columns[0].ids) == 32
    assert columns[-1].acceptance >= 1 and all(c.tokens_per_second > 0 and c.first_token_seconds > 0 for c in columns)
    assert identical(columns, settings) is True and marker_html(columns, settings) == SAME
    columns[-1].ids = [columns[-1].ids[0] + 1, *columns[-1].ids[1:]]  # one token off: a bug, shown loudly
    assert identical(columns, settings) is False and marker_html(columns, settings) == DIFFERENT
    assert "BUG" in DIFFERENT
    sampling = Settings(max_new_tokens=32, do_sample=True)
    assert identical(columns, sampling) is None and "sampling" in marker_html(columns, sampling)


@pytest.mark.parametrize(
    "prompt, max_new_tokens, message",
    [
        ("", 16, "the prompt is empty"),
        ("   \n", 16, "the prompt is empty"),
        (PROMPT, 0, "max new tokens must be a whole number from 1"),
        (PROMPT, MAX_NEW_TOKENS + 1, "max new tokens must be a whole number from 1"),
        (PROMPT, None, "max new tokens must be a whole number from 1"),
        ("word " * 5000, 16, "exceeds the"),  # longer than every model's positions
    ],
)
def test_bad_input_is_a_message_on_the_page_and_nothing_runs(loaded, prompt, max_new_tokens, message):
    updates = list(race_updates(loaded, prompt, max_new_tokens, "greedy", 1.0, 0, 0))
    assert len(updates) == 1
    status, shown, marker, _, *cells = updates[0]
    assert status == "not started" and message in shown and "\n" not in shown and marker == ""
    assert cells[: len(loaded.contenders)] == [""] * len(loaded.contenders)  # no column hangs half-way


def test_bad_sampling_settings_are_a_message(loaded):
    for temperature, top_k, message in ((0.0, 0, "temperature must be > 0"), (1.0, -1, "top-k must be >= 0")):
        (update,) = race_updates(loaded, PROMPT, 8, "sampling", temperature, top_k, 0)
        assert update[0] == "not started" and message in update[1]


def test_an_error_inside_one_column_is_shown_in_it_and_the_race_goes_on(loaded, monkeypatch):
    import rqlm.serve.race

    real = rqlm.serve.race.generate_column

    def failing(loaded, contender, *args, **kwargs):
        if contender is loaded.contenders[1]:
            raise RuntimeError("out of memory")
        return real(loaded, contender, *args, **kwargs)

    monkeypatch.setattr(rqlm.serve.race, "generate_column", failing)
    *_, columns = run_race(loaded, PROMPT, Settings(max_new_tokens=8))
    assert columns[1].error == "RuntimeError: out of memory" and columns[1].done
    assert all(c.error is None and c.new_tokens == 8 for i, c in enumerate(columns) if i != 1)


def test_last_run_is_written_beside_the_models_and_read_back(loaded):
    path = loaded.lineup.last_run_path
    path.unlink(missing_ok=True)
    *_, final = race_updates(loaded, PROMPT, 24, "greedy", 1.0, 0, 3)
    record = json.loads(path.read_text())
    assert record["prompt"] == PROMPT and record["settings"]["seed"] == 3 and record["identical"] is True
    assert [c["name"] for c in record["columns"]] == [c.name for c in loaded.contenders]
    texts = final[4:4 + len(loaded.contenders)]
    assert [c["text"] for c in record["columns"]] == list(texts)
    assert all(c["tokens_per_second"] > 0 and c["new_tokens"] == 24 for c in record["columns"])
    static = final[3]  # the page's static view, rendered from the file
    assert f"{record['columns'][0]['tokens_per_second']:,.1f}" in static and record["columns"][1]["text"] in static


def test_bad_folders_are_one_line_errors_of_rqlm_serve(demo, tmp_path, monkeypatch, capsys):
    cases = [
        (["--baseline", str(tmp_path / "nowhere")], "folder"),
        (["--baseline", str(demo / "baseline"), "--model", str(tmp_path / "nowhere")], "does not exist"),
        (["--baseline", str(demo / "baseline"), "--model", str(demo / "vae")], "'rq_vae' checkpoint"),
        (["--baseline", str(demo / "lm")], "is a latent LM"),
        (["--model", str(demo / "lm")], "pass --baseline"),
    ]
    for flags, message in cases:
        assert cli.main(["serve", *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("rqlm serve: error:"), (flags, err)
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    assert cli.main(["serve"]) == 1
    assert "run make demo first, or pass --baseline/--model" in capsys.readouterr().err


def test_two_clients_at_once_each_get_their_own_race(loaded):
    """Two sessions submit at the same moment: the queue runs one race at a time, each streamed to its own client."""
    from gradio_client import Client

    from rqlm.serve.page import build_page, launch_page

    page = build_page(loaded)
    port = free_port()
    launch_page(page, port=port, block=False)
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2)]
        prompts = ["Once upon a time", "def main():"]
        jobs = [client.submit(p, 16, "greedy", 1.0, 0, 0, api_name="/run") for client, p in zip(clients, prompts)]
        results = [job.result(timeout=120) for job in jobs]
    finally:
        page.close()
    for prompt, result in zip(prompts, results):
        *_, columns = run_race(loaded, prompt, Settings(max_new_tokens=16))
        assert result[0].startswith("finished")
        assert list(result[4:4 + len(columns)]) == [c.text for c in columns]
    assert results[0][4] != results[1][4]


def test_serve_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--baseline", "--draft", "--host", "--port"):
        assert flag in out

