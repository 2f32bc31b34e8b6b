"""Evaluation of a policy on fixed sets of problems: sources and named JSON sets, the evaluator
(greedy or K samples), mean@K / pass@k statistics, and the files an evaluation writes.

Sits above the sampler, the data layer and the scorer and below `train/`, which evaluates during RL
through `build_evaluators(ctx)` and `report.write_point`.
"""
from openvlthinker.eval.evaluator import (METRICS, Evaluator, Samples, build_evaluator,
                                          build_evaluators, format_table)
from openvlthinker.eval.sets import Decoding, EvalSet, parse_sets
from openvlthinker.eval.sources import suite_heldout

__all__ = ["METRICS", "Decoding", "EvalSet", "Evaluator", "Samples", "build_evaluator",
           "build_evaluators", "format_table", "parse_sets", "suite_heldout"]
