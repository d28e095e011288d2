"""Sample-level differential privacy at one site: Opacus DP-SGD, ε accounting, budget stop.

Privacy unit: one training subject (volume). Under DP-SGD a site's training dataset yields
exactly one random patch per subject per draw (samples-per-volume 1), Opacus samples subjects
with Poisson sampling (rate q = 1 / ceil(subjects / batch-size)) and clips each subject's
gradient to `max_grad_norm` before adding Gaussian noise, so the reported (ε, δ) bounds what the
released weights reveal about any one subject of the site's training split.

The accountant's history (noise, sample rate, steps) of a run is kept on the site's disk
(`PrivacyLedger`), so ε accumulates across rounds even when every message runs in a fresh
process. Only the ε number leaves the site.

Entry point: `SitePrivacy.attach(model, optimizer, dataset, batch_size, epochs)` wraps the three
training objects with `PrivacyEngine.make_private` for one local fit, the way Opacus' own
`make_private` does for a plain training loop.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

_host_log_handlers = list(logging.root.handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

# Opacus calls logging.basicConfig() on import, which doubles every Flower log line: undo that.
logging.root.handlers[:] = _host_log_handlers
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset

from fedseg.atomic import atomic_write_text

if TYPE_CHECKING:
    from fedseg.config import RunConfig

History = list[tuple[float, float, int]]  # Opacus accountant history: (noise multiplier, sample rate, steps)


class PrivacyBudgetExceeded(RuntimeError):
    """The next local fit would take the site's ε past its budget; nothing was trained."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings of a run (run-config keys `dp-*`)."""

    noise_multiplier: float  # σ; 0 → derived from target_epsilon over planned_epochs
    max_grad_norm: float  # per-subject clipping bound C
    delta: float
    target_epsilon: float = 0.0  # budget; 0 → none
    accountant: str = "rdp"
    planned_epochs: int = 0  # local epochs a site trains over the whole run (target-ε mode)

    @classmethod
    def from_config(cls, config: RunConfig) -> DPSettings | None:
        """The settings of a run with `dp-sgd = true`, else None."""
        if not config.dp_sgd:
            return None
        return cls(
            noise_multiplier=config.dp_noise_multiplier,
            max_grad_norm=config.dp_max_grad_norm,
            delta=config.dp_delta,
            target_epsilon=config.dp_target_epsilon,
            accountant=config.dp_accountant,
            planned_epochs=config.num_server_rounds * config.local_epochs,
        )

    def noise_for(self, sample_rate: float, steps_per_epoch: int) -> float:
        """σ: the configured one, or the smallest that keeps the planned run within target ε."""
        if self.noise_multiplier > 0:
            return self.noise_multiplier
        return float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=sample_rate,
                steps=self.planned_epochs * steps_per_epoch,
                accountant=self.accountant,
            )
        )


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Replace layers DP-SGD cannot train (BatchNorm → GroupNorm) with Opacus' ModuleValidator."""
    fixed = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]}")
    return fixed


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of an accountant history, computed by Opacus' accountant."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyLedger:
    """The accountant history of one site in one run, as a JSON file in the site's own folder."""

    path: Path

    def load(self) -> History:
        if not self.path.exists():
            return []
        try:
            entries = json.loads(self.path.read_text())["history"]
            return [(float(s), float(q), int(n)) for s, q, n in entries]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: unreadable privacy ledger ({err}); refusing to train") from err

    def save(self, history: History) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"history": [list(entry) for entry in history]}))


@dataclass
class SitePrivacy:
    """DP-SGD for the local fits of one site in one run; remembers the last ε and σ."""

    settings: DPSettings
    ledger: PrivacyLedger
    epsilon: float = 0.0
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        self.epsilon = epsilon_of(self.ledger.load(), self.settings.delta, self.settings.accountant)

    @contextmanager
    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, batch_size: int, epochs: int
    ) -> Iterator[tuple[torch.optim.Optimizer, Iterable[dict[str, torch.Tensor]], nn.Module]]:
        """Yield (DP optimizer, batches, model) for `epochs` passes; record the steps in the ledger after.

        Raises PrivacyBudgetExceeded, before touching the model, when the planned steps would
        take ε past `target_epsilon`.
        """
        loader = DataLoader(SubjectPatches(dataset), batch_size=batch_size, num_workers=0)
        steps_per_epoch = len(loader)
        sample_rate = 1.0 / steps_per_epoch  # what make_private derives from the loader
        sigma = self.settings.noise_for(sample_rate, steps_per_epoch)
        history = self.ledger.load()
        self._check_budget(history + [(sigma, sample_rate, epochs * steps_per_epoch)])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # documented in SECURITY.md
            engine = PrivacyEngine(accountant=self.settings.accountant)
        engine.accountant.history = list(history)
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=self.settings.max_grad_norm,
            wrap_model=False,
        )
        try:
            with BatchMemoryManager(
                data_loader=dp_loader, max_physical_batch_size=batch_size, optimizer=dp_optimizer
            ) as physical:
                yield dp_optimizer, _DictBatches(physical, dp_optimizer), model
        finally:
            hooks.cleanup()
            self.ledger.save(engine.accountant.history)  # steps taken count even if the fit failed
            self.epsilon = epsilon_of(engine.accountant.history, self.settings.delta, self.settings.accountant)
            self.noise_multiplier = sigma

    def metrics(self) -> dict[str, float]:
        """What the site may report: ε so far at δ, and the σ it trained with."""
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.settings.delta,
            "dp-noise-multiplier": self.noise_multiplier,
        }

    def _check_budget(self, planned: History) -> None:
        budget = self.settings.target_epsilon
        if budget <= 0:
            return
        after = epsilon_of(planned, self.settings.delta, self.settings.accountant)
        if after > budget:
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: this round would take the site's ε from {self.epsilon:.3f} to "
                f"{after:.3f} > dp-target-epsilon {budget:g} (δ={self.settings.delta:g}); the site stops training"
            )


class SubjectPatches(Dataset):
    """One (image, label) patch per subject from a MONAI patch dataset (the DP privacy unit)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item: Any = self.dataset[index]
        if isinstance(item, list):
            if len(item) != 1:
                raise ValueError(
                    f"DP-SGD needs one patch per subject per draw (samples-per-volume 1), got {len(item)}"
                )
            item = item[0]
        return item["image"], item["label"]


@dataclass(frozen=True)
class _DictBatches:
    """Re-iterable view of (image, label) batches as the trainer's {"image", "label"} dicts.

    A Poisson batch may hold no subject. It still costs a step of noise (and privacy), taken
    here without a forward pass: Opacus' functorch per-sample gradients (ConvTranspose3d,
    PReLU) cannot run on an empty batch.
    """

    loader: Iterable[Sequence[torch.Tensor]]
    optimizer: DPOptimizer

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for image, label in self.loader:
            if len(image) == 0:
                noise_only_step(self.optimizer)
                continue
            yield {"image": image, "label": label}


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP-SGD step of an empty batch: zero clipped gradient plus noise, counted by the accountant."""
    optimizer.zero_grad(set_to_none=True)
    for param in optimizer.params:
        param.grad_sample = param.new_zeros((0, *param.shape))
    optimizer.step()


def ledger_for(state_dir: Path, run_key: str) -> PrivacyLedger:
    """The ledger file of run `run_key` (the run folder's name, stable across resumes) in a site's state folder."""
    return PrivacyLedger(Path(state_dir) / "privacy" / f"run-{run_key}.json")


# ----------------------------------------------------------------------------- run summary
SAMPLE_LEVEL_MEANING = (
    "protects each training subject of that site: the weights it sent reveal almost nothing about "
    "whether any one subject's scan was used"
)
CLIENT_LEVEL_MEANING = (
    "protects each whole site: the global model reveals almost nothing about whether any one site, "
    "with all its subjects, took part"
)


def site_epsilons(history: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Latest sample-level (ε, δ) each site reported in a history.json dict (DP-SGD runs)."""
    latest: dict[str, tuple[float, float]] = {}
    for record in history.get("rounds", []):
        for site, metrics in record.get("train", {}).items():
            if "dp-epsilon" in metrics:
                latest[site] = (float(metrics["dp-epsilon"]), float(metrics["dp-delta"]))
    return dict(sorted(latest.items()))


def client_epsilon(history: Mapping[str, Any]) -> tuple[float, float] | None:
    """Latest client-level (ε, δ) the strategy reported (dp-noised), or None."""
    found = None
    for record in history.get("rounds", []):
        strategy = record.get("strategy") or {}
        if "epsilon" in strategy:
            found = (float(strategy["epsilon"]), float(strategy["delta"]))
    return found


def privacy_summary(history: Mapping[str, Any]) -> list[str]:
    """Plain-words lines on the run's privacy guarantees (empty when no DP was used)."""
    lines = []
    client = client_epsilon(history)
    if client is not None:
        lines.append(f"client-level DP (dp-noised): ε = {client[0]:.2f} at δ = {client[1]:g}; {CLIENT_LEVEL_MEANING}")
    for site, (epsilon, delta) in site_epsilons(history).items():
        lines.append(f"sample-level DP-SGD, {site}: ε = {epsilon:.2f} at δ = {delta:g}; {SAMPLE_LEVEL_MEANING}")
    stopped: dict[str, int] = {}
    for record in history.get("rounds", []):
        for failure in record.get("failures", []):
            if "privacy budget" in failure.get("reason", ""):
                stopped.setdefault(failure["site"], record["round"])
    lines += [f"{site} stopped training in round {rnd}: privacy budget reached" for site, rnd in stopped.items()]
    return lines
