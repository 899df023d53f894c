"""Safety judges: raw per-class scores for every image, and named decision rules over them.

Importing this package is cheap. A judge's heavy dependencies (onnxruntime, OpenCV, model files)
load only when ``get_judge`` builds it.
"""

from benchmark.judges.base import (
    RULES,
    DecisionRule,
    Judge,
    check_judge_available,
    get_judge,
    get_rule,
    judge_names,
    register_rule,
)

__all__ = [
    "RULES",
    "DecisionRule",
    "Judge",
    "check_judge_available",
    "get_judge",
    "get_rule",
    "judge_names",
    "register_rule",
]
