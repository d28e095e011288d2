"""The papers' protocol as one command: private, centralized, federated, IIL/CIIL, leave-one-out arms."""

from fedseg.experiments.runner import ExperimentError, run_experiment
from fedseg.experiments.spec import ExperimentSpec

__all__ = ["ExperimentError", "ExperimentSpec", "run_experiment"]
