"""``collab-lm-eval`` / ``python -m evals.lm_eval_cli``: lm-eval's command line
with the ``collab`` model type registered. All arguments go to lm-eval as is:

    collab-lm-eval --model collab --model_args spec=zoo:smollm2-135m-instruct \\
        --include_path DIR --tasks collab_arc_easy --limit 20
"""

from __future__ import annotations


def main() -> None:
    """Register the collab model type, then run lm-eval's CLI."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import evals.lm_eval_adapter  # noqa: F401 - registers the "collab" model type
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
