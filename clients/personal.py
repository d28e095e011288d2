"""What a site keeps of its own between rounds and never sends: FedBN's normalisation layers,
FedPer's output stage (whose latest version it does send), Ditto's personal model, SCAFFOLD's
control variate cᵢ and, with `keep-optimizer-state`, its optimizer's state (Adam's step count and
moments, SGD's momentum buffer).

Each lives in the site's state dir as `personal/<run-key>/<name>.pt` (written atomically), so a
deployed site (a fresh process per message), a site that was dropped and rejoins, and a resumed run
(same run key) all find it again; runs never share it. Each file also holds the version from before
its last round: when a server that died after the sites trained resumes and sends that round again,
the site starts from the same state as the first time.

The round logic the ClientApp applies around the plain local fit:

- FedBN (`local-norm`): the site starts from the global shared layers plus its own normalisation
  layers (its initial ones in its first round) and replies without normalisation layers.
- FedPer (`local-head`): the site starts from the global model with its own output stage (the
  global one in its first round), keeps the output stage it trained and replies with its whole model,
  so the global output stage is the mean of the sites' own ones.
- Ditto (`ditto-lambda` = λ): after the usual local fit (the reply), the site trains its personal
  model v for the same epochs on min L(v) + λ/2‖v − w_global‖² (Li et al. 2021) and keeps it.
- SCAFFOLD (`scaffold-c` = c): the local fit adds c − cᵢ to every gradient; then cᵢ⁺ is the mean
  of the site's raw minibatch gradients over its K local steps (Karimireddy et al. 2020's option I,
  the local gradient, averaged along the local path). Their option II, (x − yᵢ)/(K·η), equals that
  mean only for plain SGD: under Adam it measures normalised steps of size ~1 per weight and the
  correction swamps the gradients (measured: the model never learned). The site keeps cᵢ⁺ and
  replies Δcᵢ = cᵢ⁺ − cᵢ.
- `keep-optimizer-state`: the local fit continues the site's optimizer from its last round at the
  round's learning rate, as one long training would, instead of a fresh optimizer whose first Adam
  steps move every weight by about the learning rate whatever its gradient (Ditto's personal fit
  starts fresh each round).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedseg.atomic import atomic_path

Tensors = dict[str, torch.Tensor]
NORMS, HEAD, DITTO = "fedbn-norms", "fedper-head", "ditto-personal"
SCAFFOLD, OPTIMIZER = "scaffold-variate", "optimizer-state"
RESET_HINT = "delete it to start that state afresh at this site"


class PersonalStateError(ValueError):
    """A file of the site's own state that cannot be used (unreadable, or not fitting the model)."""


@dataclass(frozen=True)
class PersonalState:
    """The site's own tensors for one run."""

    state_dir: Path
    run_key: str

    @property
    def folder(self) -> Path:
        return self.state_dir / "personal" / self.run_key

    def load(self, name: str, server_round: int | None = None) -> Tensors | None:
        """The tensors as they were before round `server_round` (default: the latest)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            resent = server_round is not None and saved["round"] >= server_round  # that round is sent again
            tensors = saved["previous"] if resent else saved["current"]
            if tensors is not None and not all(isinstance(v, torch.Tensor) for v in dict(tensors).values()):
                raise TypeError("entries that are not tensors")
        except Exception as err:  # noqa: BLE001 - any unreadable content: one line naming the file
            raise PersonalStateError(f"{path}: unreadable ({type(err).__name__}); {RESET_HINT}") from None
        return tensors

    def load_layers(self, name: str, server_round: int, like: Mapping[str, torch.Tensor]) -> Tensors | None:
        """`load`, for layers of the model: the keys, shapes and dtypes must be those of `like`, and the
        values finite (a site whose own layers went non-finite would train nothing but NaN)."""
        layers = self.load(name, server_round)
        if layers is None:
            return None
        if set(layers) != set(like) or any(
            v.shape != like[k].shape or v.dtype != like[k].dtype for k, v in layers.items()
        ):
            raise PersonalStateError(f"{self.path(name)}: not this model's layers; {RESET_HINT}")
        if not all(bool(torch.isfinite(v).all()) for v in layers.values() if v.is_floating_point()):
            raise PersonalStateError(f"{self.path(name)}: holds non-finite values; {RESET_HINT}")
        return layers

    def path(self, name: str) -> Path:
        """The file holding `name`."""
        return self.folder / f"{name}.pt"

    def save(self, name: str, tensors: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Keep `tensors` as the state after round `server_round`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self.load(name, server_round)
        with atomic_path(self.path(name)) as tmp:
            current = {key: value.detach().cpu().clone() for key, value in tensors.items()}
            torch.save({"round": server_round, "current": current, "previous": previous}, tmp)

    def has_own_model(self) -> bool:
        """Whether the site keeps a whole personal model of its own (Ditto), not only its own layers."""
        return self.path(DITTO).is_file()

    def keeps_personal_model(self) -> bool:
        """Whether `personal_model` has something of this site's for this run (without reading it)."""
        return any(self.path(name).is_file() for name in (DITTO, NORMS, HEAD))

    def personal_model(self, global_state: Mapping[str, torch.Tensor]) -> Tensors | None:
        """The site's personal model: Ditto's, else the global model with the site's own
        normalisation layers (FedBN) and output stage (FedPer); None when the run keeps nothing
        personal here."""
        ditto = self.load(DITTO)
        if ditto is not None:
            return ditto
        own = [layers for layers in (self.load(NORMS), self.load(HEAD)) if layers is not None]
        return {**global_state, **{k: v for layers in own for k, v in layers.items()}} if own else None


def scaffold_update(
    variate: Mapping[str, torch.Tensor], mean_gradients: Mapping[str, torch.Tensor]
) -> tuple[Tensors, Tensors]:
    """(cᵢ⁺, Δcᵢ) for the keys of `variate`: the mean local gradient where the site has one (network
    parameters), the old value elsewhere (e.g. normalisation statistics)."""
    updated = {k: mean_gradients[k].float() if k in mean_gradients else variate[k] for k in variate}
    return updated, {k: updated[k] - variate[k] for k in variate}
