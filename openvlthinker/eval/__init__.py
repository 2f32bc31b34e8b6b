"""Evaluation of a policy on a fixed set of problems: sources, the greedy evaluator, the report.

Sits above the sampler, the data layer and the scorer and below `train/`, which evaluates during RL
through `build_evaluator(ctx)`.
"""
from openvlthinker.eval.evaluator import METRICS, Evaluator, build_evaluator, format_table
from openvlthinker.eval.sources import suite_heldout

__all__ = ["METRICS", "Evaluator", "build_evaluator", "format_table", "suite_heldout"]
