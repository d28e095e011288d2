"""Sample-level differential privacy at one site: Opacus DP-SGD, ε accounting, budget stop.

Privacy unit: one training subject (volume). Under DP-SGD a site's training dataset yields, per
subject and draw, `dp-augmentation-multiplicity` K random patches (each differently augmented);
Opacus samples subjects with Poisson sampling (rate q = 1 / ceil(subjects / batch-size), so
`batch-size` is the expected logical batch), the K per-patch gradients of a subject are averaged
into one per-subject gradient (augmentation multiplicity, De et al. 2022), which is clipped to
`max_grad_norm` before Gaussian noise is added, so the reported (ε, δ) bounds what the released
weights reveal about any one subject of the site's training split. Opacus' BatchMemoryManager
splits a logical batch into physical ones of at most `dp-physical-batch-size` subjects; the noise
is added once per logical batch.

Noise source (`dp-noise-source`): "torch" is Opacus' default, torch's Mersenne Twister for the
Poisson draws and Gaussians (seeded by the run's seed at each fit: reproducible, and so
predictable to whoever knows the seed); "secure" draws both from fedseg.noise.SecureGaussian
(ChaCha20 keyed by the OS CSPRNG, Opacus' four-Gaussian floating-point mitigation).

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
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

_host_log_handlers = list(logging.root.handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.data_loader import wrap_collate_with_empty  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.optimizers.optimizer import _mark_as_processed  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

# Opacus calls logging.basicConfig() on import, which doubles every Flower log line: undo that.
logging.root.handlers[:] = _host_log_handlers
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate  # noqa: E402

from fedseg.atomic import atomic_write_text  # noqa: E402
from fedseg.json_records import fault_without_path, read_json_object  # noqa: E402
from fedseg.noise import SecureGaussian  # noqa: E402

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
    physical_batch_size: int = 0  # subjects per forward/backward pass; 0 → the logical batch size
    augmentation_multiplicity: int = 1  # augmented patches per subject per draw (one privacy unit)
    noise_source: str = "torch"  # "torch" (Opacus' default) or "secure" (fedseg.noise.SecureGaussian)

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
            planned_epochs=int(config.num_server_rounds * config.local_epochs),  # whole epochs under DP-SGD
            physical_batch_size=config.dp_physical_batch_size,
            augmentation_multiplicity=config.dp_augmentation_multiplicity,
            noise_source=config.dp_noise_source,
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
            entries = read_json_object(self.path)["history"]  # capped like every record fedseg reads back
            history = [(float(s), float(q), int(n)) for s, q, n in entries]
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            fault = fault_without_path(self.path, err)
            raise ValueError(f"{self.path}: unreadable privacy ledger ({fault}); refusing to train") from err
        for sigma, rate, steps in history:  # a NaN or negative entry would make every later ε garbage
            if not (math.isfinite(sigma) and sigma >= 0 and 0 <= rate <= 1 and steps >= 0):
                raise ValueError(
                    f"{self.path}: privacy ledger entry (noise {sigma}, sample rate {rate}, steps {steps}) is not "
                    "a finite noise >= 0, a rate in [0, 1] and steps >= 0; refusing to train"
                )
        return history

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
        self._source = SecureGaussian() if self.settings.noise_source == "secure" else None

    @contextmanager
    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, batch_size: int, epochs: int
    ) -> Iterator[tuple[Any, Iterable[dict[str, torch.Tensor]], nn.Module]]:
        """Yield (DP optimizer, batches, model) for `epochs` passes; record the steps in the ledger after.
        The optimizer is Opacus' DPOptimizer or, with augmentation multiplicity, a _PerSubjectGradients
        in front of it (duck-typed: zero_grad and step).

        Raises PrivacyBudgetExceeded, before touching the model, when the planned steps would
        take ε past `target_epsilon`.
        """
        subjects = SubjectPatches(dataset, self.settings.augmentation_multiplicity)
        secure = self.settings.noise_source == "secure"
        steps_per_epoch = -(-len(subjects) // batch_size)
        sample_rate = 1.0 / steps_per_epoch  # what make_private derives from the loader
        if self._source is not None:
            loader = secure_poisson_loader(subjects, sample_rate, steps_per_epoch, self._source)
        else:
            loader = DataLoader(subjects, batch_size=batch_size, num_workers=0)
        sigma = self.settings.noise_for(sample_rate, steps_per_epoch)
        history = self.ledger.load()
        self._check_budget([*history, (sigma, sample_rate, epochs * steps_per_epoch)])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # documented in SECURITY.md
            engine = (
                _SecureNoiseEngine(self._source, accountant=self.settings.accountant)
                if self._source
                else PrivacyEngine(accountant=self.settings.accountant)
            )
        engine.accountant.history = list(history)
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=self.settings.max_grad_norm,
            wrap_model=False,
            poisson_sampling=not secure,  # the secure loader draws its Poisson batches itself
        )
        multiplicity = self.settings.augmentation_multiplicity
        physical_size = min(self.settings.physical_batch_size or batch_size, batch_size)
        try:
            with BatchMemoryManager(
                data_loader=dp_loader, max_physical_batch_size=physical_size, optimizer=dp_optimizer
            ) as physical:
                optimizer_view = _PerSubjectGradients(dp_optimizer, multiplicity) if multiplicity > 1 else dp_optimizer
                yield optimizer_view, _DictBatches(physical, dp_optimizer), model
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
    """The `multiplicity` (image, label) patches one subject yields per draw from a MONAI patch
    dataset (the DP privacy unit): tensors of shape (channels, D, H, W), or with multiplicity > 1
    (multiplicity, channels, D, H, W)."""

    def __init__(self, dataset: Dataset, multiplicity: int = 1) -> None:
        self.dataset = dataset
        self.multiplicity = multiplicity

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item: Any = self.dataset[index]
        patches = item if isinstance(item, list) else [item]
        if len(patches) != self.multiplicity:
            raise ValueError(
                f"DP-SGD needs {self.multiplicity} patch(es) per subject per draw "
                f"(dp-augmentation-multiplicity), the dataset gave {len(patches)}"
            )
        if self.multiplicity == 1:
            return patches[0]["image"], patches[0]["label"]
        return (
            torch.stack([torch.as_tensor(p["image"]) for p in patches]),
            torch.stack([torch.as_tensor(p["label"]) for p in patches]),
        )


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
            if image.dim() == 6:  # (subjects, multiplicity, C, D, H, W): the patches go through one by one
                image, label = image.flatten(0, 1), label.flatten(0, 1)
            yield {"image": image, "label": label}


@dataclass(frozen=True)
class _PerSubjectGradients:
    """The DP optimizer, with each subject's K per-patch gradients averaged into one before clipping
    (augmentation multiplicity: the batch holds K consecutive patches per subject)."""

    optimizer: DPOptimizer
    multiplicity: int

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self) -> Any:
        for param in self.optimizer.params:
            sample = param.grad_sample
            if sample is not None and len(sample):
                param.grad_sample = sample.view(-1, self.multiplicity, *sample.shape[1:]).mean(dim=1)
        return self.optimizer.step()


class SecurePoissonSampler(Sampler[list[int]]):
    """Opacus' Poisson batches (each subject in with probability `sample_rate`), drawn from a CSPRNG."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, source: SecureGaussian) -> None:
        self.num_samples, self.sample_rate, self.steps, self.source = num_samples, sample_rate, steps, source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield [int(i) for i in np.flatnonzero(self.source.random(self.num_samples) < self.sample_rate)]


def secure_poisson_loader(dataset: Dataset, sample_rate: float, steps: int, source: SecureGaussian) -> DataLoader:
    """A loader of Poisson batches from `SecurePoissonSampler` (an empty batch is zero-length tensors)."""
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate, sample_empty_shapes=[(0, *x.shape) for x in first], dtypes=[x.dtype for x in first]
    )
    sampler = SecurePoissonSampler(len(dataset), sample_rate, steps, source)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer adding its Gaussian noise from a `SecureGaussian` instead of torch's generator."""

    def __init__(self, *args: Any, source: SecureGaussian, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for param in self.params:
            summed = param.summed_grad
            noise = self.source.normal(0.0, std, summed.numel()) if std > 0 else np.zeros(summed.numel())
            param.grad = (summed + torch.from_numpy(noise).to(summed).view_as(summed)).view_as(param)
            _mark_as_processed(summed)


class _SecureNoiseEngine(PrivacyEngine):
    """A PrivacyEngine whose optimizer is a SecureNoiseDPOptimizer (flat clipping, one process)."""

    def __init__(self, source: SecureGaussian, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source

    def _prepare_optimizer(self, *, optimizer: torch.optim.Optimizer, **kwargs: Any) -> DPOptimizer:
        made = super()._prepare_optimizer(optimizer=optimizer, **kwargs)
        return SecureNoiseDPOptimizer(
            made.original_optimizer,
            noise_multiplier=made.noise_multiplier,
            max_grad_norm=made.max_grad_norm,
            expected_batch_size=made.expected_batch_size,
            loss_reduction=made.loss_reduction,
            source=self.source,
        )


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
                latest[site] = (_number(metrics["dp-epsilon"]), _number(metrics["dp-delta"]))
    return dict(sorted(latest.items()))


def client_epsilon(history: Mapping[str, Any]) -> tuple[float, float] | None:
    """Latest client-level (ε, δ) the strategy reported (dp-noised), or None."""
    found = None
    for record in history.get("rounds", []):
        strategy = record.get("strategy") or {}
        if "epsilon" in strategy:
            found = (_number(strategy["epsilon"]), _number(strategy["delta"]))
    return found


def _number(value: Any) -> float:
    """ε or δ of a history.json as a float; ValueError (not OverflowError) for a whole number beyond any float."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError("an ε or δ too large for a floating-point number") from None


def privacy_summary(history: Mapping[str, Any]) -> list[str]:
    """Plain-words lines on the run's privacy guarantees (empty when no DP was used)."""
    lines = []
    client = client_epsilon(history)
    if client is not None:
        strategy = history.get("config", {}).get("strategy", "dp-noised")  # dp-noised or dp-distributed
        lines.append(f"client-level DP ({strategy}): ε = {client[0]:.2f} at δ = {client[1]:g}; {CLIENT_LEVEL_MEANING}")
    for site, (epsilon, delta) in site_epsilons(history).items():
        lines.append(f"sample-level DP-SGD, {site}: ε = {epsilon:.2f} at δ = {delta:g}; {SAMPLE_LEVEL_MEANING}")
    stopped: dict[str, int] = {}
    for record in history.get("rounds", []):
        for failure in record.get("failures", []):
            if "privacy budget" in failure.get("reason", ""):
                stopped.setdefault(failure["site"], record["round"])
    lines += [f"{site} stopped training in round {rnd}: privacy budget reached" for site, rnd in stopped.items()]
    return lines
