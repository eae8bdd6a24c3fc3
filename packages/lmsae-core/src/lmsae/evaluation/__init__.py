"""Evaluation of dictionaries inside the language model (splicing: CE loss recovered, KL).

Reconstruction metrics over activation streams live in :mod:`lmsae.training.evaluation`; the
``evaluate`` task (:mod:`lmsae.tasks.evaluate`) combines both.
"""

from lmsae.evaluation.splice import (
    SpliceAccumulator,
    SpliceMode,
    SpliceOrderError,
    evaluate_splice,
    splice_losses,
    splice_metrics,
)

__all__ = ["SpliceAccumulator", "SpliceMode", "SpliceOrderError", "evaluate_splice", "splice_losses", "splice_metrics"]
