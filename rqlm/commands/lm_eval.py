"""`rqlm lm-eval ARGS...`: lm-evaluation-harness's own command line, with the `rqlm` model registered.

lm-eval 0.4.13 finds models only in its own registry (it reads no plugin entry points), so this command
imports the adapter (rqlm/evaluation/lm_eval_adapter.py, `@register_model("rqlm")`) and hands ARGS
unchanged to lm-eval's CLI: the same flags, the same output files. When ARGS name no `--include_path`,
the package's local task folder (rqlm/lm_eval_tasks: rqlm_heldout_text, rqlm_next_paragraph) is added,
and its data are built first (once, from the embedded corpus); an `--include_path` you pass is left alone.

    rqlm lm-eval --model rqlm --model_args pretrained=runs/demo/lm --tasks rqlm_heldout_text,rqlm_next_paragraph
    rqlm lm-eval --model rqlm --model_args pretrained=runs/demo/lm --tasks hellaswag,lambada_openai,wikitext
"""

from __future__ import annotations

import sys

from rqlm.lm_eval_tasks import TASKS_DIR, build_task_data


def with_local_tasks(argv: list[str]) -> list[str]:
    """ARGS with `--include_path <rqlm/lm_eval_tasks>` appended, unless they already name one."""
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return list(argv)
    if not argv or argv in (["run"], ["ls"], ["validate"]) or "-h" in argv or "--help" in argv:
        return list(argv)  # help screens: lm-eval's own, unchanged
    return [*argv, "--include_path", str(TASKS_DIR)]


def main_argv(argv: list[str]) -> int:
    """Run lm-eval's CLI on `argv` (as `lm-eval argv...`) with the rqlm model registered; its exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError:
        raise ValueError("lm-eval is not installed; pip install 'rqlm[eval]' (or lm-eval>=0.4)") from None
    import rqlm.evaluation.lm_eval_adapter  # noqa: F401  (registers --model rqlm)

    argv = with_local_tasks(argv)
    if str(TASKS_DIR) in argv:
        build_task_data()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors and --help exit; their code is the status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
