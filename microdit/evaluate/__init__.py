"""Evaluation: FID on COCO-2014 val, GenEval, CLIP score, and the exact shapes evaluator + Fréchet distance.

    python -m microdit.evaluate --checkpoint runs/demo/stage4 --suite shapes
    from microdit.evaluate import evaluate; report = evaluate("runs/demo/stage4", suites=["shapes"])
"""
from .config import SUITES, EvalConfig
from .frechet import frechet_distance
from .rules import Detection, check_image, relative_position, summarize


def evaluate(checkpoint, suites=("shapes",), out_dir=None, **options) -> dict:
    """Run evaluation suites on a checkpoint (see `microdit.evaluate.run.evaluate`)."""
    from .run import evaluate as _evaluate
    return _evaluate(checkpoint, suites, out_dir, **options)


__all__ = ["SUITES", "EvalConfig", "Detection", "check_image", "evaluate", "frechet_distance",
           "relative_position", "summarize"]
