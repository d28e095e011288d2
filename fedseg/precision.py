"""Training precision (run-config `precision`): fp32, or mixed precision with bf16 or fp16 autocast.

"auto" is bf16 autocast on a GPU and fp32 elsewhere; an explicit choice applies on any device. fp16
needs a gradient scaler (torch.amp.GradScaler) so that small gradients do not underflow; bf16 has
fp32's range and needs none.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How one device trains and infers: the autocast dtype (None: plain fp32)."""

    name: str
    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name not in PRECISIONS:
            raise ValueError(f"precision '{name}': choose one of {', '.join(PRECISIONS)}")
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        return cls(name, device.type, _DTYPES[name])

    def autocast(self) -> AbstractContextManager[None]:
        """Mixed-precision forward passes (a no-op context in fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (a pass-through scaler otherwise)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)
