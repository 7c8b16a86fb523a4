"""Small trainable modules the model layer adds to a family (no rclpy).

:class:`TokenAdapter` is the *vision-side adapter* of the trainable set: a residual MLP on
each vision token, applied by the student after the shared (frozen) encoder and before its
own bridge (Q-Former / projector). It lets a round re-map what a shift did to the tokens --
fog's low contrast, night's colour cast -- before the bridge reads them; the tokens that go
uplink, and the teacher, never see it. Its output layer starts at zero, so a fresh adapter is
the identity and adding one changes no answer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cdcca_ros.errors import ConfigError

TOKEN_ADAPTER = 'cdcca_token_adapter'
"""Attribute name of the adapter on the family's torch model (and its parameter prefix)."""


class TokenAdapter(nn.Module):
    """``x + W_2 gelu(W_1 LayerNorm(x))`` per token, ``W_2`` zero at start.

    Args:
        dim: Token width ``D``.
        hidden: Hidden width of the MLP.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ConfigError(f'TokenAdapter widths must be >= 1, got dim={dim}, '
                              f'hidden={hidden}')
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """``[..., D]`` -> ``[..., D]`` in the tokens' dtype."""
        x = tokens.to(self.up.weight.dtype)
        out = x + self.down(nn.functional.gelu(self.up(self.norm(x))))
        return out.to(tokens.dtype)


def build_token_adapter(dim: int, hidden: int, seed: int = 0, device: torch.device | str = 'cpu',
                        dtype: torch.dtype = torch.float32) -> TokenAdapter:
    """A seeded adapter (cloud and device build the same one), global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = TokenAdapter(dim, hidden)
    return adapter.to(device=device, dtype=dtype)
