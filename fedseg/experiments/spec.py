"""An experiment config (TOML): which arms to run over which sites, and the shared run config.

```toml
[experiment]
name = "quick-cpu"            # results go to <output-dir>/<name>/
data-dir = "data/quick"       # holds site-0 ... site-<n-1> (and the outside institution)
sites = 3
outside = "outside"           # folder under data-dir tested on but never trained on ("" for none)
output-dir = "results"
arms = ["private", "centralized", "federated", "iil", "ciil", "leave-one-out"]
strategies = ["fedavg", "fedprox"]   # one federated arm each (leave-one-out and fine-tuning use the first)
finetune-rounds = 0           # > 0: fine-tune the federated model at each site for this many rounds
ensemble-folds = 0            # >= 2: also k-fold submodel ensembles of `ensemble-arms`
ensemble-arms = ["private", "centralized", "federated"]
overlay-cases = 1             # test cases per test set saved as overlay slices
dp-sgd-noise-multipliers = [0.5, 1.0]     # privacy sweep: one arm of the first strategy with DP-SGD at every
                                          # site per value (run-config dp-noise-multiplier), e.g. fedavg-dpsgd-z0.5
dp-noised-noise-multipliers = [0.1, 1.0]  # one client-level `dp-noised` arm per noise multiplier, e.g. dp-noised-z0.1

[run]                         # fedseg run config shared by every arm (README "Run config")
num-server-rounds = 4
local-epochs = 1
[run.fedprox]                 # strategy parameters, as in a run config
proximal-mu = 0.01
```
Every arm trains for the same budget: num-server-rounds × local-epochs epochs at each site.
The sweep's other DP settings come from [run] (dp-max-grad-norm, dp-delta, dp-accountant;
[run.dp-noised] clipping-norm, target-delta); each DP arm's final ε goes into cases.csv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fedseg.config import ConfigError, RunConfig, flatten, read_toml
from strategies.registry import build_strategy

ARM_KINDS = ("private", "centralized", "federated", "iil", "ciil", "leave-one-out")
EXPERIMENT_KEYS = {
    "name",
    "data-dir",
    "sites",
    "outside",
    "output-dir",
    "arms",
    "strategies",
    "finetune-rounds",
    "ensemble-folds",
    "ensemble-arms",
    "overlay-cases",
    "dp-sgd-noise-multipliers",
    "dp-noised-noise-multipliers",
}
SWEEPS = ("dp_sgd_noise_multipliers", "dp_noised_noise_multipliers")
# The TOML type of each [experiment] key (the sweeps are checked by _noise_values).
KEY_TYPES: dict[str, type] = {
    "name": str,
    "data-dir": str,
    "sites": int,
    "outside": str,
    "output-dir": str,
    "arms": list,
    "strategies": list,
    "finetune-rounds": int,
    "ensemble-folds": int,
    "ensemble-arms": list,
    "overlay-cases": int,
}
UPPER_BOUNDS = {"sites": 1000, "finetune-rounds": 100_000, "ensemble-folds": 100, "overlay-cases": 1000}
RUN_KEYS_SET_BY_ARMS = ("strategy", "data-dir", "output-dir", "min-sites", "resume-from")


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment config."""

    name: str
    data_dir: str
    sites: int
    run: dict[str, Any]
    outside: str = "outside"
    output_dir: str = "results"
    arms: tuple[str, ...] = ("private", "centralized", "federated")
    strategies: tuple[str, ...] = ("fedavg",)
    finetune_rounds: int = 0
    ensemble_folds: int = 0
    ensemble_arms: tuple[str, ...] = ()
    overlay_cases: int = 1
    dp_sgd_noise_multipliers: tuple[float, ...] = ()
    dp_noised_noise_multipliers: tuple[float, ...] = ()

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name

    def site_dir(self, site: int) -> Path:
        return (Path(self.data_dir).expanduser() / f"site-{site}").resolve()

    @property
    def outside_dir(self) -> Path | None:
        return (Path(self.data_dir).expanduser() / self.outside).resolve() if self.outside else None

    def run_values(self, **overrides: Any) -> dict[str, Any]:
        """Flat run-config mapping (as Flower's run_config) of the shared values plus arm-specific ones."""
        return {**self.run, "data-dir": self.data_dir, "min-sites": self.sites, **overrides}

    def run_config(self, **overrides: Any) -> RunConfig:
        """The shared run config with arm-specific values (validated)."""
        return RunConfig.from_mapping(self.run_values(**overrides))

    def with_seed(self, seed: int) -> ExperimentSpec:
        """The same study at another seed (split, initial model, draws): `[run] seed` replaced and the results
        in `<name>-seed<seed>`; the config's own seed (default 0) keeps its name, so it is the same run."""
        if seed == self.run_config().seed:
            return self
        spec = replace(self, name=f"{self.name}-seed{seed}", run={**self.run, "seed": seed})
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentSpec:
        """Read and validate; every error names the file and the key."""
        data = read_toml(path, "experiment config")
        try:
            return cls.from_mapping(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        unknown_tables = set(data) - {"experiment", "run"}
        if unknown_tables or "experiment" not in data:
            raise ConfigError(
                f"needs an [experiment] table and an optional [run] table; unexpected: {sorted(unknown_tables)}"
            )
        for table in ("experiment", "run"):
            if not isinstance(data.get(table, {}), Mapping):
                raise ConfigError(f"'{table}' must be a table ([{table}]), got {type(data[table]).__name__}")
        experiment = dict(data["experiment"])
        _check_types(experiment)
        unknown = set(experiment) - EXPERIMENT_KEYS
        if unknown:
            raise ConfigError(
                f"unknown [experiment] key(s) {sorted(unknown)}; valid: {', '.join(sorted(EXPERIMENT_KEYS))}"
            )
        missing = [k for k in ("name", "data-dir", "sites") if k not in experiment]
        if missing:
            raise ConfigError(f"[experiment] needs {', '.join(missing)}")
        run = flatten(data.get("run", {}))
        fixed = [key for key in RUN_KEYS_SET_BY_ARMS if key in run]
        if fixed:
            raise ConfigError(f"[run] key(s) {fixed} are set by the experiment for each arm; remove them")
        values = {key.replace("-", "_"): value for key, value in experiment.items()}
        for key in ("arms", "strategies", "ensemble_arms"):
            if key in values:
                values[key] = tuple(values[key])
        for key in SWEEPS:
            if key in values:
                values[key] = _noise_values(key, values[key])
        spec = cls(run=run, **values)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Check names, counts and the run config before anything trains."""
        for key, value in (("name", self.name), ("outside", self.outside)):
            if not _plain_name(value) and (key == "name" or value):
                raise ConfigError(f"[experiment] '{key}' must be a plain folder name, got {value!r}")
        for key, value in (("data-dir", self.data_dir), ("output-dir", self.output_dir)):
            if not value.strip() or any(c in value for c in "\0\n\r"):
                raise ConfigError(f"[experiment] '{key}' must name a folder, got {value!r}")
        if not Path(self.output_dir).expanduser().is_absolute() and Path(os.path.normpath(self.output_dir)).parts[
            :1
        ] == ("..",):
            raise ConfigError(
                f"[experiment] 'output-dir' {self.output_dir!r} climbs out of the working folder; give a "
                "folder below it, or an absolute path"
            )
        if self.sites < 2:
            raise ConfigError(f"[experiment] 'sites' must be >= 2, got {self.sites}")
        trained = [k for k in range(self.sites) if self.outside_dir == self.site_dir(k)]
        if trained:
            raise ConfigError(
                f"[experiment] 'outside' {self.outside!r} is site-{trained[0]}, a site the experiment trains on, "
                "not an outside institution"
            )
        for key, bound in UPPER_BOUNDS.items():
            if getattr(self, key.replace("-", "_")) > bound:
                raise ConfigError(
                    f"[experiment] '{key}' must be <= {bound}, got {getattr(self, key.replace('-', '_'))}"
                )
        bad = [arm for arm in self.arms if arm not in ARM_KINDS]
        if bad or not self.arms:
            raise ConfigError(f"[experiment] 'arms' has {bad or 'nothing'}; choose from: {', '.join(ARM_KINDS)}")
        if not self.strategies:
            raise ConfigError("[experiment] 'strategies' must name at least one strategy")
        lists = (("arms", self.arms), ("strategies", self.strategies), ("ensemble-arms", self.ensemble_arms))
        for key, values in lists:
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"[experiment] '{key}' names {repeated[0]!r} more than once")
        if self.ensemble_folds == 1 or self.ensemble_folds < 0:
            raise ConfigError(f"[experiment] 'ensemble-folds' must be 0 (off) or >= 2, got {self.ensemble_folds}")
        bad = [arm for arm in self.ensemble_arms if arm not in ("private", "centralized", "federated")]
        if bad:
            raise ConfigError(f"[experiment] 'ensemble-arms' has {bad}; choose from: private, centralized, federated")
        if self.ensemble_folds and not self.ensemble_arms:
            raise ConfigError(
                f"[experiment] 'ensemble-folds' = {self.ensemble_folds} ensembles nothing without 'ensemble-arms' "
                "(private, centralized, federated)"
            )
        if self.finetune_rounds < 0 or self.overlay_cases < 0:
            raise ConfigError("[experiment] 'finetune-rounds' and 'overlay-cases' must be >= 0")
        for strategy in self.strategies:
            build_strategy(self.run_config(strategy=strategy))
        build_strategy(self.run_config(strategy="cyclic", **{"secure-aggregation": False}))  # cyclic arms: no sum
        if self.run_config().secure_aggregation and "leave-one-out" in self.arms and self.sites < 4:
            raise ConfigError(
                f"[run] 'secure-aggregation' needs 3 sites in every arm that sums updates; the "
                f"leave-one-out arms of {self.sites} sites have {self.sites - 1}"
            )
        self._validate_sweep()

    def _validate_sweep(self) -> None:
        """Each sweep arm's run config must be valid, and each arm must carry one DP kind only."""
        sweep = self.dp_sgd_noise_multipliers or self.dp_noised_noise_multipliers
        if self.run_config().dp_sgd and (sweep or "dp-noised" in self.strategies):
            raise ConfigError(
                "[run] 'dp-sgd' must be off with a privacy sweep or the dp-noised strategy: "
                "cases.csv records one DP kind per model (the sweep turns DP on per arm)"
            )
        first = self.strategies[0]
        if self.dp_sgd_noise_multipliers and first == "dp-noised":
            raise ConfigError(
                "[experiment] 'dp-sgd-noise-multipliers' trains the first strategy with DP-SGD; "
                "it must not be 'dp-noised' (one DP kind per arm)"
            )
        for z in self.dp_sgd_noise_multipliers:
            build_strategy(self.run_config(strategy=first, **{"dp-sgd": True, "dp-noise-multiplier": z}))
        for z in self.dp_noised_noise_multipliers:
            build_strategy(self.run_config(strategy="dp-noised", **{"dp-noised.noise-multiplier": z}))


def _check_types(experiment: Mapping[str, Any]) -> None:
    """Each known [experiment] key has its TOML type (lists: of strings), else ConfigError naming it."""
    for key, kind in KEY_TYPES.items():
        if key not in experiment:
            continue
        value = experiment[key]
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            wanted = {int: "a whole number", str: "a string", list: "a list of strings"}[kind]
            raise ConfigError(f"[experiment] '{key}' must be {wanted}, got {value!r}")


def _plain_name(value: str) -> bool:
    """A folder name without separators that stays in its parent (not '.' or '..')."""
    return bool(value.strip()) and value not in (".", "..") and not any(c in value for c in "/\\\0\n\r")


def _noise_values(key: str, values: Any) -> tuple[float, ...]:
    """A sweep's noise multipliers: distinct numbers > 0 (0 would mean no privacy, or a derived σ)."""
    name = key.replace("_", "-")
    if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"[experiment] '{name}' must be a list of numbers, got {values!r}")
    floats = tuple(float(v) for v in values)
    if any(not 0 < v < float("inf") for v in floats) or len(set(floats)) != len(floats):
        raise ConfigError(f"[experiment] '{name}' needs distinct noise multipliers > 0, got {list(values)}")
    return floats
