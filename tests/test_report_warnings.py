"""The demo report warns when its run cannot be compared with an idle machine's (issue 26: a busy machine gave the
baseline 48 steps where an idle one makes 589, and the report said nothing)."""

from rqlm.reporting.report import IDLE_STEPS_PER_MINUTE, render_report, run_warnings


def _metrics(steps: dict, minutes: dict, stage_seconds: dict, quick: bool = False) -> dict:
    training = {stage: {"steps": steps[stage], "tokens_seen": 0, "train_minutes": minutes[stage]} for stage in steps}
    return {"conditions": {"quick": quick, "training": training, "stage_seconds": stage_seconds}}


IDLE = {stage: int(rate * 2) for stage, rate in IDLE_STEPS_PER_MINUTE.items()}  # two minutes at the idle rate
TWO_MINUTES = dict.fromkeys(IDLE, 2.0)


def test_an_idle_run_has_no_warning():
    assert run_warnings(_metrics(IDLE, TWO_MINUTES, {"baseline": 300, "lm": 400})) == []


def test_a_stage_far_below_the_idle_rate_and_a_long_run_are_warned_about():
    slow = dict(IDLE, baseline=48)  # the busy machine's baseline: 48 steps in its two minutes
    warnings = run_warnings(_metrics(slow, TWO_MINUTES, {"baseline": 700, "lm": 540}))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("Qwen3 baseline made 48 steps (24 a minute; an idle 2-core CPU makes about 196)")
    assert "20.7 minutes" in warnings[1]
    just_above = dict(IDLE, baseline=int(0.5 * IDLE_STEPS_PER_MINUTE["baseline"] * 2) + 1)
    assert run_warnings(_metrics(just_above, TWO_MINUTES, {})) == []


def test_a_quick_run_is_never_warned_about():
    assert run_warnings(_metrics(dict.fromkeys(IDLE, 1), TWO_MINUTES, {"lm": 5000}, quick=True)) == []


def test_the_warnings_lead_the_report(monkeypatch):
    from rqlm.reporting import report

    for name in ("headline_columns", "headline_rows", "table_rows", "conditions_text", "report_models"):
        monkeypatch.setattr(report, name, lambda *a, **k: [])
    monkeypatch.setattr(report, "markdown_table", lambda *a: "TABLE")
    monkeypatch.setattr(report, "conditions_text", lambda *a: "CONDITIONS")
    text = render_report({"warnings": ["the baseline made 48 steps"]}, [], [], {})
    assert text.index("> **Warning**: the baseline made 48 steps.") < text.index("TABLE")
