"""The check before round 1: the configured network builds, and maps a batch of patches to logits of
the patch's shape (one tensor: no deep-supervision lists, no classifier outputs).

The network is built and run on PyTorch's meta device (shapes only, no memory, no arithmetic);
networks whose construction needs real numbers (e.g. SwinUNETR) are checked on the CPU instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedseg.errors import first_line
from fedseg.models import ModelError, build_model, count_parameters

CHECK_BATCH = 2  # batch norm in training mode needs more than one value per channel


def check_network(
    name: str, args: Mapping[str, Any], in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> int:
    """The network's parameter count; ModelError saying what does not fit otherwise."""
    try:
        return _forward_check(torch.device("meta"), name, args, in_channels, out_channels, patch_size)
    except Exception:  # noqa: BLE001 - e.g. an operation the meta device lacks: check with real numbers
        try:
            with torch.no_grad():
                return _forward_check(torch.device("cpu"), name, args, in_channels, out_channels, patch_size)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - the network's own failure, in one line
            raise ModelError(
                f"model '{name}' fails on a batch of {CHECK_BATCH} patches of "
                f"{'x'.join(map(str, patch_size))} voxels: {type(err).__name__}: "
                f"{first_line(err)}"
            ) from None


def _forward_check(
    device: torch.device,
    name: str,
    args: Mapping[str, Any],
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
) -> int:
    with device:
        model = build_model(name, in_channels, out_channels, args).train()  # training mode: deep supervision shows
        output = model(torch.zeros(CHECK_BATCH, in_channels, *patch_size))
    expected = (CHECK_BATCH, out_channels, *patch_size)
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"model '{name}' returns {type(output).__name__} in training, fedseg needs one tensor of "
            "logits (turn deep supervision or auxiliary outputs off)"
        )
    if tuple(output.shape) != expected:
        raise ModelError(
            f"model '{name}' maps a batch of shape {(CHECK_BATCH, in_channels, *patch_size)} to "
            f"{tuple(output.shape)}, fedseg needs {expected} (a segmentation network whose patch "
            "sides fit its down-sampling, see run-config 'patch-size')"
        )
    return count_parameters(model)
