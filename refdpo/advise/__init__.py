"""`refdpo advise`: before training, whether a reference will help the policy and which β (and mixture λ) to
use, from stored log-prob columns only. scores.py: the compatibility scores C1–C5; rules.py: the β rules
B1–B3 and the verdict; report.py: bootstrap intervals, tables and plots."""

from refdpo.advise.rules import Advice, advise
from refdpo.advise.scores import Columns, scores

__all__ = ["Advice", "Columns", "advise", "scores"]
