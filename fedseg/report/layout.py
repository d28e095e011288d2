"""Files of a results folder, written by the experiment runner and read by the report.

```
results/<experiment>/
  cases.csv                   per-case Dice of every finished arm (the report's only required input)
  arms/<arm-id>/arm.json      what the arm was (arm, kind, trained_on, model bytes, sites, seconds, software)
  arms/<arm-id>/history.json  per-round Dice, train loss and seconds (federated and cyclic arms)
  arms/<arm-id>/cases.csv     this arm's rows (cases.csv is their concatenation)
  arms/<arm-id>/final-model.pt  the final model (fedseg.model_checkpoint format), for `fedseg predict`
  overlays/<case>/<arm-id>.npz  one slice of image, truth and prediction (for the overlay plot)
  experiment.json             the experiment config (a rerun with another config is refused)
  retest.json                 `fedseg retest` only: the experiment, its results, the outside folder tested, software
  views/                      pooled and k-fold site views (links to the sites' files)
  site-state/<site or view>/  each node's own state: DP-SGD privacy ledgers (one per arm), preprocessed cache
```
Checkpoints and overlays stay local: never commit them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedseg.json_records import read_json_object, record_float, record_int, record_text
from fedseg.report.cases import CasesError

CASES = "cases.csv"
ARMS = "arms"
ARM_INFO = "arm.json"
HISTORY = "history.json"
MODEL = "final-model.pt"
OVERLAYS = "overlays"
SITE_STATE = "site-state"


@dataclass(frozen=True)
class ArmInfo:
    """What one finished arm was, for plots that need more than cases.csv."""

    arm: str
    kind: str
    trained_on: str
    model_bytes: int
    sites: int
    seconds: float
    software: dict[str, str] = field(default_factory=dict)  # fedseg.software; empty: arm.json from before it

    def save(self, folder: Path) -> None:
        (folder / ARM_INFO).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ArmInfo:
        """The arm.json in `folder`; CasesError naming it (and the key) when it is not one."""
        path = folder / ARM_INFO
        try:
            info = cls(**read_json_object(path))
            info._check(path)
        except TypeError as err:  # a key missing or unknown
            raise CasesError(f"{path}: not an arm record ({type(err).__name__})") from None
        except ValueError as err:
            raise CasesError(str(err)) from None
        return info

    def _check(self, path: Path) -> None:
        """ValueError naming `path` and the key when a value has the wrong type or is out of range."""
        for key in ("arm", "kind", "trained_on"):
            record_text(path, key, getattr(self, key))
        record_int(path, "model_bytes", self.model_bytes)
        record_int(path, "sites", self.sites)
        record_float(path, "seconds", self.seconds)
        if not isinstance(self.software, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.software.items()
        ):
            raise ValueError(f"{path}: 'software' must map package names to version strings")


PERSONAL = "-personal"  # each site's personal model of federated arm <name>: arm <name>-personal
PERSONAL_MEAN = "-ensemble"  # each site's mean of its personal and the global model: arm <name>-ensemble
FEDERATION = "federation"  # what a federated arm is trained on


def arm_id(arm: str, trained_on: str) -> str:
    """Folder name of one model: `<arm>--<trained_on>`."""
    return f"{arm}--{trained_on}"


def trained_in(arm: str, kind: str, trained_on: str) -> str:
    """The arm folder whose run trained a model: a personal model's is its federated arm's."""
    for suffix in (PERSONAL, PERSONAL_MEAN):
        if kind == "personal" and arm.endswith(suffix):
            return arm_id(arm.removesuffix(suffix), FEDERATION)
    return arm_id(arm, trained_on)


def overlay_case(tested_on: str, subject: str) -> str:
    """Folder name of one test case under overlays/."""
    return f"{tested_on}--{subject}"
