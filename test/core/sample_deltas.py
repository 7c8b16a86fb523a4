"""Deltas of the shapes a trainable set has, for the DWC and codec tests (seeded)."""
from __future__ import annotations

import torch


def lora_like(seed: int = 0, hidden: int = 128, rank: int = 8, layers: int = 2,
              heavy: float = 0.0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A LoRA-like trainable-set delta: A/B pairs, norms, biases, query tokens."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for mod in ('q_proj', 'v_proj'):
            shapes[f'layers.{layer}.{mod}.lora_A.weight'] = (rank, hidden)
            shapes[f'layers.{layer}.{mod}.lora_B.weight'] = (hidden, rank)
        shapes[f'layers.{layer}.norm.weight'] = (hidden,)
        shapes[f'layers.{layer}.fc1.bias'] = (4 * hidden,)
    shapes['qformer.query_tokens'] = (1, 8, hidden)
    out = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g) * scale
        if heavy:
            # A heavy-tailed fraction: Student-t(2) values five times wider.
            mask = torch.rand(shape, generator=g) < heavy
            # (chi-squared with 2 degrees of freedom from the seeded generator, so the data
            # do not depend on the global RNG, i.e. on which tests ran before)
            chi2 = torch.randn(shape, generator=g) ** 2 + torch.randn(shape, generator=g) ** 2
            t = torch.randn(shape, generator=g) / torch.sqrt(chi2 / 2.0)
            x = torch.where(mask, t * 5 * scale, x)
        out[name] = x
    return out


def mixed_dtypes() -> dict[str, torch.Tensor]:
    """Small delta with every supported dtype, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(3)
    return {
        'w32': torch.randn(16, 24, generator=g) * 1e-3,
        'w16': (torch.randn(40, generator=g) * 1e-2).half(),
        'wbf': (torch.randn(4, 10, generator=g) * 1e-2).bfloat16(),
        'w64': torch.randn(33, generator=g, dtype=torch.float64) * 1e-3,
        'scalar': torch.tensor(0.25),
        'empty': torch.zeros(0, 5),
    }
