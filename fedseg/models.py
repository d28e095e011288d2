"""MONAI 3D segmentation networks by name, all built as `build_model(name, in_ch, out_ch)`.

Sizes are kept modest so CPU simulations stay quick; every network maps a
`(batch, in_channels, D, H, W)` tensor to `(batch, out_channels, D, H, W)` logits.
Spatial patch sides must be multiples of `PATCH_MULTIPLE[name]`.
"""

from __future__ import annotations

from collections.abc import Callable

from monai.networks.nets import AHNet, DynUNet, SegResNet, UNet
from torch import nn


def _unet(in_channels: int, out_channels: int) -> nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
        norm=("instance", {"affine": True}),  # affine, as nnU-Net's: FedBN has per-site scales and shifts to keep
    )


def _segresnet(in_channels: int, out_channels: int) -> nn.Module:
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=8)


def _dynunet(in_channels: int, out_channels: int) -> nn.Module:
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3, 3, 3, 3],
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=[16, 32, 64, 128],
    )


def _ahnet(in_channels: int, out_channels: int) -> nn.Module:
    # AHNet, the network of the prostate study (Sarma et al. 2021); its 3D form takes one channel.
    if in_channels != 1:
        raise ValueError(f"model 'ahnet' takes 1 input channel, got {in_channels}")
    return AHNet(spatial_dims=3, in_channels=1, out_channels=out_channels, layers=(2, 2, 2, 2), psp_block_num=0)


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "unet": _unet,
    "segresnet": _segresnet,
    "dynunet": _dynunet,
    "ahnet": _ahnet,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
PATCH_MULTIPLE: dict[str, int] = {"unet": 8, "segresnet": 8, "dynunet": 8, "ahnet": 32}


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # batch / instance, group, layer


def norm_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's normalisation layers: affine weights, biases, running statistics
    (what FedBN keeps at each site)."""
    prefixes = [f"{name}." for name, module in model.named_modules() if isinstance(module, NORM_LAYERS)]
    return frozenset(key for key in model.state_dict() if any(key.startswith(prefix) for prefix in prefixes))


def build_model(name: str, in_channels: int, out_channels: int) -> nn.Module:
    """Return a fresh, randomly initialised network `name` (see MODEL_NAMES)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}") from None
    return builder(in_channels, out_channels)
