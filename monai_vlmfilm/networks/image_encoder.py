"""A separate image pathway for the flow UNet: a ``BasicUNet``-style encoder feeding the UNet's skip connections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import Conv
from monai.networks.nets.basic_unet import Down, TwoConv

__all__ = ["ImageSkipEncoder", "skip_layout"]


def skip_layout(channels: Sequence[int], num_res_blocks: Sequence[int]) -> list[tuple[int, int]]:
    """``(level, channels)`` of every skip tensor ``DiffusionModelUNet.forward`` collects, in order.

    ``conv_in`` gives one at level 0; down block ``i`` gives one per residual block at level ``i`` and, unless it
    is the last block, one after its downsampler at level ``i + 1``.
    """
    layout = [(0, int(channels[0]))]
    for i, ch in enumerate(channels):
        layout += [(i, int(ch))] * int(num_res_blocks[i])
        if i < len(channels) - 1:
            layout.append((i + 1, int(ch)))
    return layout


class ImageSkipEncoder(nn.Module):
    """Encodes the image with MONAI ``BasicUNet`` blocks and projects each level onto the flow UNet's skips.

    The flow UNet otherwise sees the image only as an input channel next to the noisy mask, through time-conditioned
    GroupNorm residual blocks. This pathway is a plain supervised encoder (``TwoConv`` then ``Down`` per level,
    instance norm, LeakyReLU: ``BasicUNet``'s), independent of the flow time. Its features are added to the
    ``down_block_additional_residuals`` (the skips the decoder reads) and the ``mid_block_additional_residual``
    through 1x1 projections that start at zero, so a fresh encoder leaves the UNet's output unchanged (ControlNet's
    zero convolutions).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: image channels.
        features: encoder width per level, one per UNet level (level ``l`` is at 1/2^l of the input size).
        skips: ``(level, channels)`` of each UNet skip, from :func:`skip_layout`.
        mid_channels: channels of the UNet's mid block (at the deepest level).
        act: activation of the encoder blocks.
        norm: normalisation of the encoder blocks.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        skips: Sequence[tuple[int, int]],
        mid_channels: int,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        n_levels = max(level for level, _ in skips) + 1
        if len(features) != n_levels:
            raise ValueError(f"image encoder needs one width per UNet level ({n_levels}), got {features}.")
        blocks = [TwoConv(spatial_dims, in_channels, features[0], act, norm, bias=True)]
        blocks += [Down(spatial_dims, features[i - 1], features[i], act, norm, bias=True) for i in range(1, n_levels)]
        self.blocks = nn.ModuleList(blocks)
        conv = Conv[Conv.CONV, spatial_dims]
        self.skip_levels = [int(level) for level, _ in skips]
        self.skip_proj = nn.ModuleList([conv(features[level], ch, kernel_size=1) for level, ch in skips])
        self.mid_proj = conv(features[-1], mid_channels, kernel_size=1)
        for proj in [*self.skip_proj, self.mid_proj]:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(skip residuals, mid residual)`` for ``DiffusionModelUNet.forward``."""
        feats = []
        h = image
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        skips = [proj(feats[level]) for level, proj in zip(self.skip_levels, self.skip_proj)]
        return skips, self.mid_proj(feats[-1])
