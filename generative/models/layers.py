"""Small 3-D building blocks shared by the VAE and the UNet."""

from __future__ import annotations

from torch import nn


def conv3d(in_channels: int, out_channels: int, *, circular: bool = False, kernel_size: int = 3):
    """A same-size 3-D convolution, with periodic (circular) or zero padding."""
    return nn.Conv3d(
        in_channels,
        out_channels,
        kernel_size,
        padding=kernel_size // 2,
        padding_mode="circular" if circular else "zeros",
    )


class ConvBlock(nn.Sequential):
    """Conv3d -> BatchNorm3d -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, circular: bool = False) -> None:
        super().__init__(
            conv3d(in_channels, out_channels, circular=circular),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(0.2),
        )


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no trainable parameters (gradients still flow through)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
