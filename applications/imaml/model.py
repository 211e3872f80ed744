"""The convolutional network of the MAML line of work, used functionally.

Each block is a 3x3 convolution with 64 filters, batch norm, ReLU and 2x2
max-pooling; a linear head maps the flattened features to ``n_way`` logits.
The paper's network has four blocks with padding 1 (the default); the
example scripts of higher and TorchOpt use three blocks without padding
(``blocks=3, padding=0``: 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1, so the head
sees 64 features). Batch norm always normalises with the statistics of the batch it sees
(``track_running_stats=False``): each task's support or query set, as in
MAML, so nothing leaks between tasks and evaluation behaves like training.

The parameters live outside the module as a dict (``theta`` / ``phi``) and
the network is evaluated with :func:`torch.func.functional_call`, which is
what :mod:`bilevel` differentiates.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNet", "init_params", "INIT_SCHEMES"]

#: Initialisations of :func:`init_params`.
INIT_SCHEMES = ("he", "torch")


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
    blocks:
        Convolution blocks (default 4).
    padding:
        Zero padding of each convolution: 1 (default, sizes halve per block) or 0.

    Examples
    --------
    >>> net = ConvNet(5)
    >>> net(torch.zeros(10, 1, 28, 28)).shape
    torch.Size([10, 5])
    >>> ConvNet(5, blocks=3, padding=0).head.in_features
    64
    """

    def __init__(self, n_way: int, *, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 blocks: int = 4, padding: int = 1):
        super().__init__()
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}.")
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}.")
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {padding!r}.")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, hidden, 3, padding=padding),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, (size + 2 * padding - 2) // 2
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for {blocks} blocks with padding "
                                 f"{padding}; use fewer blocks, padding=1 or larger images.")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, n_way)`` for images of shape ``(batch, C, H, W)``."""
        return self.head(self.features(x).flatten(1))


def init_params(model: nn.Module, *, seed: int = 0, device: str | torch.device = "cpu",
                scheme: str = "he") -> dict[str, torch.Tensor]:
    """A fresh, seeded copy of ``model``'s parameters as a dict of leaf tensors that require grad.

    Parameters
    ----------
    model:
        The network whose parameter names and shapes are copied.
    seed:
        Seeds the draw (the same seed gives the same parameters on every device).
    device:
        Where the parameters live.
    scheme:
        ``"he"`` (default): convolutions ``U(-sqrt(6/fan_in), +)``, the head
        ``U(-1/sqrt(fan_in), +)``, zero biases. ``"torch"``: PyTorch's own
        default for ``nn.Conv2d`` / ``nn.Linear`` (weights and biases
        ``U(-1/sqrt(fan_in), +)``), as the peers' example scripts use. Behind
        batch norm the scale of a convolution does not change the function,
        but it sets how far one inner gradient step moves it: the smaller
        ``"torch"`` weights adapt about six times faster per step.

    Examples
    --------
    >>> params = init_params(ConvNet(5), seed=0)
    >>> sorted(params)[:2], params["head.weight"].shape
    (['features.0.bias', 'features.0.weight'], torch.Size([5, 64]))
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; available: {', '.join(INIT_SCHEMES)}.")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    fan_ins = {name.rsplit(".", 1)[0]: p[0].numel() for name, p in model.named_parameters()
               if name.endswith("weight") and p.dim() > 1}
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if scheme == "torch" and module in fan_ins:  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +)
            bound = 1.0 / fan_ins[module] ** 0.5
            value = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        elif name.endswith("weight") and p.dim() > 1:
            fan_in = p[0].numel()
            bound = (6.0 / fan_in) ** 0.5 if "head" not in name else (1.0 / fan_in) ** 0.5
            value = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        elif name.endswith("weight"):  # batch-norm scale
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        out[name] = value.to(device=device, dtype=p.dtype).requires_grad_(True)
    return out
