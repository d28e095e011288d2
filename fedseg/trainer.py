"""SegmentationTrainer: MONAI 3D segmentation training and evaluation, no Flower inside.

fit() trains from given start weights for some epochs (optionally with a FedProx proximal
term or sharpness-aware steps: fedseg.sharpness); evaluate() runs sliding-window inference on whole
volumes and returns the Dice of every scored structure (classes, or BraTS tumour regions: the
`LabelScheme` decides the network's outputs, the loss and the scoring).
Precision follows fedseg.precision (default: bf16 autocast on CUDA, fp32 elsewhere; fp16 with a
gradient scaler); data loading uses `num_workers` processes. On CUDA it can compile the training
forward and leaves cuDNN free to pick its fastest kernels; on CPU with a seed it is deterministic.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.utils import set_determinism
from torch import nn

from fedseg.enhancing import CANDIDATES, enhancing_dice_by_candidate
from fedseg.labels import LabelScheme
from fedseg.models import build_model
from fedseg.optim import (
    OptimizerFactory,
    load_optimizer_moments,
    one_step_state,
    optimizer_factory,
    optimizer_moments,
)
from fedseg.personal_mix import CANDIDATES as CANDIDATE_WEIGHTS
from fedseg.personal_mix import dice_by_candidate
from fedseg.precision import Precision
from fedseg.privacy import SitePrivacy, make_dp_compatible
from fedseg.sharpness import ascended, kept_statistics

StateDict = Mapping[str, torch.Tensor]
SW_BATCH_SIZE = 4  # sliding windows per forward pass in evaluation (predict takes fewer where memory is short)


@dataclass(frozen=True)
class FitResult:
    """What one local training call produced."""

    train_loss: float
    num_examples: int
    seconds: float
    steps: int = 0  # optimizer steps taken
    # per parameter, the raw gradients' mean over the steps (with sam_rho: those at the ascended weights)
    mean_gradients: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None  # after the fit, when it was asked to continue one


@dataclass(frozen=True)
class EvalResult:
    """Dice of every scored structure (foreground class or tumour region), per case and averaged."""

    per_case: np.ndarray  # (cases, structures), NaN where undefined (a class absent from the truth)
    seconds: float = 0.0
    enhancing: np.ndarray | None = None  # when asked: (cases, candidates) ET Dice per threshold (fedseg.enhancing)
    # when asked: (cases, candidates, structures) Dice of the mean with a personal model (fedseg.personal_mix)
    personal_weights: np.ndarray | None = None
    class_dice: list[float] = field(init=False)
    mean_dice: float = field(init=False)

    def __post_init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # a class absent from every case
            class_dice = np.nan_to_num(np.nanmean(self.per_case, axis=0), nan=0.0) if len(self.per_case) else []
        object.__setattr__(self, "class_dice", [float(d) for d in class_dice])
        object.__setattr__(self, "mean_dice", float(np.mean(class_dice)) if len(class_dice) else 0.0)

    @property
    def num_cases(self) -> int:
        return int(self.per_case.shape[0])


class SegmentationTrainer:
    """Trains and evaluates one MONAI network on one site's datasets."""

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        patch_size: Sequence[int],
        in_channels: int = 1,
        batch_size: int = 2,
        learning_rate: float = 1e-3,
        device: str | torch.device | None = None,
        precision: str = "auto",
        num_workers: int = 0,
        compile: bool = False,
        dp_compatible: bool = False,
        labels: LabelScheme | None = None,
        optimizer: OptimizerFactory | None = None,
        model_args: Mapping[str, Any] | None = None,
        sam_rho: float = 0.0,
        sw_batch_size: int = SW_BATCH_SIZE,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.labels = labels or LabelScheme("classes", num_classes)
        model = build_model(model_name, in_channels, self.labels.out_channels, model_args)  # fedseg.models
        self.model: nn.Module = (make_dp_compatible(model) if dp_compatible else model).to(self.device)
        self.num_classes = num_classes
        self.patch_size = tuple(patch_size)
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.precision = Precision.resolve(precision, self.device)
        self.num_workers = num_workers  # data-loading worker processes (0: in this process)
        self.loss_fn = self.labels.loss()
        self.make_optimizer = optimizer or optimizer_factory("adam")
        self.sam_rho = sam_rho  # > 0: sharpness-aware steps (fedseg.sharpness), two passes per step
        self.sw_batch_size = sw_batch_size  # sliding windows per forward pass in evaluation
        # Training goes through the compiled wrapper; weights, evaluation (varying window batches)
        # and the state dict keys stay on the plain module, which shares its parameters.
        self._train_forward: Callable[..., Any] = torch.compile(self.model) if compile else self.model

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the model's state dict on the CPU: later training does not change it (on the CPU
        `.cpu()` alone would return the model's own tensors)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def set_weights(self, state: StateDict) -> None:
        """Load weights (strict: every key and shape must match)."""
        self.model.load_state_dict(state, strict=True)

    # ---------------------------------------------------------------- training
    def fit(
        self,
        dataset: Dataset,
        epochs: float,
        start_weights: StateDict | None = None,
        prox_mu: float = 0.0,
        seed: int | None = None,
        privacy: SitePrivacy | None = None,
        learning_rate: float | None = None,
        prox_anchor: StateDict | None = None,
        gradient_correction: StateDict | None = None,
        average_gradients: bool = False,
        optimizer_state: StateDict | None = None,
    ) -> FitResult:
        """Train `epochs` passes over `dataset` at `learning_rate` (default: the trainer's); a fractional
        part trains that share of one more shuffled pass (0.5: the first half of its batches).

        With prox_mu > 0 add (mu/2)·‖w − a‖² to the loss, a = `prox_anchor` (Ditto: the global
        model) or the start weights (FedProx). `gradient_correction` (SCAFFOLD's c − cᵢ, by
        parameter name) is added to every gradient before each step; with `average_gradients` the
        result carries each parameter's mean raw gradient (before the correction) over the steps.
        With `optimizer_state` (fedseg.optim.optimizer_moments; empty: a fresh optimizer) the optimizer
        continues from it at this fit's learning rate, and the result carries its state after the fit;
        fedseg.optim.OptimizerStateError when it does not fit this model and optimizer.
        With the trainer's `sam_rho` > 0 each step applies the gradient at the ascended weights
        (fedseg.sharpness), the proximal term included; those are the gradients corrected and summed.
        With `privacy` the fit is DP-SGD (fedseg.privacy): one patch per subject, Poisson
        sampling, per-subject clipping and noise; proximal terms and corrections are refused there.
        """
        if privacy is not None and self.precision.name == "fp16":
            raise ValueError("DP-SGD cannot train in fp16: Opacus' per-sample gradients are not loss-scaled")
        if privacy is not None and not float(epochs).is_integer():
            raise ValueError(f"DP-SGD trains whole epochs (the accountant counts Poisson steps), got {epochs:g}")
        if self.sam_rho > 0 and (privacy is not None or self.precision.name == "fp16"):
            raise ValueError("sharpness-aware steps need plain gradients: not with DP-SGD, nor with fp16 loss scaling")
        if privacy is not None and (prox_mu > 0 or gradient_correction is not None):
            raise ValueError(
                "DP-SGD cannot train a proximal term or a gradient correction (Opacus replaces the gradient)"
            )
        if seed is not None:
            _seed_everything(seed, dataset, keep_cudnn_flags=self.device.type == "cuda")
        if start_weights is not None:
            self.set_weights(start_weights)
        anchor = None
        if prox_mu > 0:
            source = prox_anchor if prox_anchor is not None else dict(self.model.named_parameters())
            anchor = [source[name].detach().to(self.device).clone() for name, _ in self.model.named_parameters()]
        named = list(self.model.named_parameters())
        params = [param for _, param in named]
        gradient_sums = {name: torch.zeros_like(p) for name, p in named} if average_gradients else None
        correction = None
        if gradient_correction is not None:
            correction = [(p, gradient_correction[name].to(self.device)) for name, p in self.model.named_parameters()]
        rate = learning_rate if learning_rate is not None else self.learning_rate  # 0.0: a schedule's end
        optimizer = self.make_optimizer(self.model.parameters(), rate)
        names = [name for name, _ in named]
        if optimizer_state:
            load_optimizer_moments(optimizer, names, optimizer_state, one_step_state(self.make_optimizer))
        # (the optimizer, or DP-SGD's wrapper that steps like one; the batches; the forward pass)
        session: AbstractContextManager[tuple[Any, Iterable[dict[str, torch.Tensor]], Callable[..., Any]]]
        if privacy is None:
            loader = DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=True,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,  # kept across this fit's epochs
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            )
            session = nullcontext((optimizer, loader, self._train_forward))
        else:  # Opacus' hooks sit on the plain module
            session = privacy.attach(self.model, optimizer, dataset, self.batch_size, int(epochs))
        self.model.train()
        started = time.perf_counter()
        total_loss, steps = torch.zeros((), device=self.device), 0  # summed on the device: no sync per step
        scaler = self.precision.scaler()  # fp16 only; a pass-through otherwise
        with session as (stepper, batches, forward):
            for batch in _passes(batches, epochs):
                image = batch["image"].to(self.device, non_blocking=True)
                label = batch["label"].to(self.device, non_blocking=True)
                stepper.zero_grad(set_to_none=True)
                loss = self._loss(forward, image, label, prox_mu, anchor)
                scaler.scale(loss).backward()
                if self.sam_rho > 0:  # the gradient at the ascended weights, applied at the weights
                    with ascended(params, self.sam_rho), kept_statistics(self.model):
                        stepper.zero_grad(set_to_none=True)
                        self._loss(forward, image, label, prox_mu, anchor).backward()
                scaler.unscale_(stepper)  # true gradients for the sums, the corrections and the step
                if gradient_sums is not None:
                    for name, param in named:
                        if param.grad is not None:
                            gradient_sums[name] += param.grad
                for param, extra in correction or ():
                    if param.grad is not None:
                        param.grad.add_(extra)
                scaler.step(stepper)  # skipped when fp16 gradients overflowed
                scaler.update()
                total_loss += loss.detach()
                steps += 1
        return FitResult(
            train_loss=float(total_loss) / max(steps, 1),
            num_examples=len(dataset),
            seconds=time.perf_counter() - started,
            steps=steps,
            mean_gradients={k: (v / max(steps, 1)).cpu() for k, v in gradient_sums.items()} if gradient_sums else None,
            optimizer_state=optimizer_moments(optimizer, names) if optimizer_state is not None else None,
        )

    def _loss(
        self,
        forward: Callable[..., Any],
        image: torch.Tensor,
        label: torch.Tensor,
        prox_mu: float,
        anchor: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """The segmentation loss of one batch, plus (mu/2)·‖w − a‖² when there is a proximal anchor."""
        with self.precision.autocast():
            loss = self.loss_fn(forward(image), self.labels.loss_target(label))
        if anchor is not None:
            loss = loss + 0.5 * prox_mu * _squared_distance(self.model.parameters(), anchor)
        return cast(torch.Tensor, loss)

    def release_memory(self) -> None:
        """Hand cached, unused GPU memory back to the driver (other site processes may share the GPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits for a (batch, channels, D, H, W) volume."""
        self.model.eval()
        with self.precision.autocast():
            logits = sliding_window_inference(
                image.to(self.device),
                roi_size=self.patch_size,
                sw_batch_size=self.sw_batch_size,
                predictor=self.model,
                overlap=0.25,
            )
        return cast(torch.Tensor, logits).float()  # MONAI also types tuple- and dict-returning predictors

    def evaluate(
        self,
        dataset: Dataset,
        weights: StateDict | None = None,
        enhancing: bool = False,
        personal: StateDict | None = None,
    ) -> EvalResult:
        """Dice of every scored structure on every whole volume of `dataset`; with `enhancing` (BraTS) also
        each case's ET Dice at every candidate post-processing threshold (fedseg.enhancing); with `personal`
        (a site's whole personal model) also each case's Dice of the mean of the two models at every
        personal weight (fedseg.personal_mix). The evaluated weights stay loaded."""
        if weights is not None:
            self.set_weights(weights)
        shared = self.get_weights() if personal is not None else None
        started = time.perf_counter()
        rows, candidates, mixes = [], [], []
        try:
            for batch in DataLoader(dataset, batch_size=1, num_workers=self.num_workers):
                probabilities = self.labels.probabilities(self.predict_logits(batch["image"]).cpu())
                rows.append(self.labels.dice(probabilities, batch["label"]).numpy())
                if enhancing:
                    candidates.append(enhancing_dice_by_candidate(self.labels, probabilities, batch["label"]))
                if personal is not None and shared is not None:
                    self.set_weights(personal)
                    own = self.labels.probabilities(self.predict_logits(batch["image"]).cpu())
                    self.set_weights(shared)
                    mixes.append(dice_by_candidate(self.labels, probabilities, own, batch["label"]))
        finally:
            if shared is not None:
                self.set_weights(shared)
        structures = len(self.labels.structures)
        per_case = np.concatenate(rows) if rows else np.zeros((0, structures))
        by_candidate = None
        if enhancing:
            by_candidate = np.concatenate(candidates) if candidates else np.zeros((0, len(CANDIDATES)))
        by_weight = None
        if personal is not None:
            by_weight = np.concatenate(mixes) if mixes else np.zeros((0, len(CANDIDATE_WEIGHTS), structures))
        seconds = time.perf_counter() - started
        return EvalResult(per_case=per_case, seconds=seconds, enhancing=by_candidate, personal_weights=by_weight)


def steps_per_fit(num_examples: float, epochs: float, batch_size: int) -> int:
    """Optimizer steps a fit of `epochs` over `num_examples` subjects takes, as `_passes` walks the
    batches (under DP-SGD: its logical steps, one per expected Poisson batch of whole epochs)."""
    batches = math.ceil(num_examples / batch_size)
    whole, fraction = divmod(epochs, 1.0)
    return int(whole) * batches + (_partial_pass(fraction, batches) if fraction else 0)


def _partial_pass(fraction: float, batches_per_pass: int) -> int:
    """Batches of a fractional pass: round(fraction × batches per pass), at least one."""
    return max(1, round(fraction * batches_per_pass))


def _passes(batches: Iterable[Any], epochs: float) -> Iterator[Any]:
    """The batches of `epochs` passes over `batches` (each pass a fresh shuffle): the whole passes, then
    the first round(fraction × batches per pass) batches of one more, at least one."""
    whole, fraction = divmod(epochs, 1.0)
    for _ in range(int(whole)):
        yield from batches
    if fraction:
        yield from itertools.islice(batches, _partial_pass(fraction, len(cast(Sized, batches))))


def _squared_distance(params: Iterable[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum((((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)), torch.zeros(()))


def _seed_everything(seed: int, dataset: Dataset, keep_cudnn_flags: bool = False) -> None:
    """Seed every RNG; with keep_cudnn_flags, undo MONAI's switch to slower deterministic cuDNN kernels."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_determinism(seed=seed)
    if keep_cudnn_flags:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
