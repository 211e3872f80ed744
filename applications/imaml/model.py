"""The standard 4-block convolutional network of the MAML line of work, used functionally.

Each block is a 3x3 convolution with 64 filters (padding 1), batch norm, ReLU
and 2x2 max-pooling; a linear head maps the flattened features to ``n_way``
logits. Batch norm always normalises with the statistics of the batch it sees
(``track_running_stats=False``): each task's support or query set, as in
MAML, so nothing leaks between tasks and evaluation behaves like training.

The parameters live outside the module as a dict (``theta`` / ``phi``) and
the network is evaluated with :func:`torch.func.functional_call`, which is
what :mod:`bilevel` differentiates.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNet", "init_params"]


class ConvNet(nn.Module):
    """The 4-block conv net.

    Parameters
    ----------
    n_way:
        Number of output classes.
    in_channels:
        1 for Omniglot, 3 for mini-ImageNet.
    image_size:
        Height (= width) of the inputs: 28 for Omniglot, 84 for mini-ImageNet.
    hidden:
        Filters per convolution: 64 (Omniglot), 32 is usual for mini-ImageNet.

    Examples
    --------
    >>> net = ConvNet(5)
    >>> net(torch.zeros(10, 1, 28, 28)).shape
    torch.Size([10, 5])
    """

    def __init__(self, n_way: int, *, in_channels: int = 1, image_size: int = 28, hidden: int = 64):
        super().__init__()
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}.")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings; use at least 16.")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, n_way)`` for images of shape ``(batch, C, H, W)``."""
        return self.head(self.features(x).flatten(1))


def init_params(model: nn.Module, *, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A fresh, seeded copy of ``model``'s parameters as a dict of leaf tensors that require grad.

    Examples
    --------
    >>> params = init_params(ConvNet(5), seed=0)
    >>> sorted(params)[:2], params["head.weight"].shape
    (['features.0.bias', 'features.0.weight'], torch.Size([5, 64]))
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() > 1:
            fan_in = p[0].numel()
            bound = (6.0 / fan_in) ** 0.5 if "head" not in name else (1.0 / fan_in) ** 0.5
            value = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        elif name.endswith("weight"):  # batch-norm scale
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        out[name] = value.to(device=device, dtype=p.dtype).requires_grad_(True)
    return out
