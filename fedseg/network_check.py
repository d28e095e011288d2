"""The check before round 1: the configured network has at most `MAX_PARAMETERS` parameters, builds, and
maps a batch of patches to logits of the patch's shape (one tensor: no deep-supervision lists, no
classifier outputs).

The parameters are counted on PyTorch's meta device (names and shapes only, no memory), so that no
size of `model-args` allocates anything before it is refused. The network is then run on the meta device
(no arithmetic); networks whose construction or forward pass needs real numbers (e.g. SwinUNETR) are
run on the CPU instead, once their size is known to fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedseg.errors import first_line
from fedseg.limits import MAX_PARAMETERS
from fedseg.models import ModelError, build_model, count_parameters, network_shapes

CHECK_BATCH = 2  # batch norm in training mode needs more than one value per channel


def check_network(
    name: str, args: Mapping[str, Any], in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> int:
    """The network's parameter count; ModelError saying what does not fit otherwise."""
    shapes = network_shapes(name, in_channels, out_channels, args)
    count = count_parameters(shapes)
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"model '{name}' has {count:,} parameters, more than the {MAX_PARAMETERS:,} fedseg builds: "
            "choose smaller model arguments"
        )
    try:
        with torch.device("meta"):
            _forward_check(shapes, name, in_channels, out_channels, patch_size)
    except Exception:  # noqa: BLE001 - e.g. an operation the meta device lacks: check with real numbers
        try:
            with torch.no_grad():
                network = build_model(name, in_channels, out_channels, args)
                _forward_check(network, name, in_channels, out_channels, patch_size)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - the network's own failure, in one line
            raise ModelError(
                f"model '{name}' fails on a batch of {CHECK_BATCH} patches of "
                f"{'x'.join(map(str, patch_size))} voxels: {type(err).__name__}: "
                f"{first_line(err)}"
            ) from None
    return count


def _forward_check(
    network: nn.Module, name: str, in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> None:
    """ModelError unless `network` maps a batch of patches (on the current default device) to logits of their shape."""
    output = network.train()(torch.zeros(CHECK_BATCH, in_channels, *patch_size))  # training: deep supervision shows
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
