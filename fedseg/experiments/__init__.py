"""The papers' protocol as one command: private, centralized, federated, IIL/CIIL, leave-one-out arms."""

from fedseg.experiments.evaluation import ExperimentError
from fedseg.experiments.runner import run_experiment
from fedseg.experiments.spec import ExperimentSpec

__all__ = ["ExperimentError", "ExperimentSpec", "run_experiment"]
