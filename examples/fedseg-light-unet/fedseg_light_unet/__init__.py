"""A 3D U-Net of depthwise-separable convolutions: 156 k parameters against 1.19 M for fedseg's "unet"
preset at the same widths (one input channel, three classes), so every round sends an eighth of the bytes.

Each block is twice (depthwise 3×3×3 convolution → pointwise 1×1×1 convolution → instance norm with
affine parameters → LeakyReLU); the encoder halves the grid with max pooling after every level but
the last, the decoder doubles it with a transposed convolution and joins the skip connection. Patch
sides must be multiples of 2^(len(features) - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


def _separable(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_in, kernel_size=3, padding=1, groups=c_in, bias=False),
        nn.Conv3d(c_in, c_out, kernel_size=1, bias=False),
        nn.InstanceNorm3d(c_out, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_separable(c_in, c_out), _separable(c_out, c_out))


class LightUNet(nn.Module):
    """3D U-Net of depthwise-separable convolutions (fewer parameters to send each round)."""

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        if len(features) < 2 or any(f < 1 for f in features):
            raise ValueError(f"features needs at least 2 positive widths, got {tuple(features)}")
        self.stem = nn.Conv3d(in_channels, features[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(_block(a, b) for a, b in zip((features[0], *features[:-1]), features, strict=True))
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, kernel_size=2, stride=2) for a, b in pairwise(features))
        self.merge = nn.ModuleList(_block(2 * a, a) for a in features[:-1])
        self.head = nn.Conv3d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(reversed(self.up), reversed(self.merge), reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)
