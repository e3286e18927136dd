"""The GenEval summary of a results file, printed as the benchmark's `summary_scores.py` prints it.

    python -m microdit.evaluate.summary runs/local/eval/results_geneval.jsonl
    python -m microdit.evaluate.summary results.jsonl        # written by GenEval's own evaluate_images.py

Rules (`rules.summarize`): per task the mean of `correct` over its images, overall = mean over the tasks.
"""
from __future__ import annotations

import argparse

from microdit.cli import run_cli

from .rules import summarize_file


def format_summary(summary: dict) -> str:
    lines = [f"Total images: {summary['images']}", f"Total prompts: {summary['prompts']}",
             f"% correct images: {summary['correct_images']:.2%}", f"% correct prompts: {summary['correct_prompts']:.2%}"]
    lines += [f"{tag:<16} = {t['score']:.2%} ({round(t['score'] * t['images'])} / {t['images']})"
              for tag, t in summary["tasks"].items()]
    return "\n".join(lines + [f"Overall score (avg. over tasks): {summary['overall']:.5f}"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m microdit.evaluate.summary",
                                 description="GenEval summary of a results JSON-lines file (summary_scores.py rules)")
    ap.add_argument("results", help="results_geneval.jsonl, or the results file of GenEval's evaluate_images.py")
    print(format_summary(summarize_file(ap.parse_args(argv).results)))


if __name__ == "__main__":
    run_cli(main, extra_user_errors=(ValueError,))
