"""The device's trainable weights packed in flat buffers, and how they reach the model.

The runtime keeps its own copy of the weights in use packed in flat buffers
(:class:`FlatWeights`), so Eq. 8 is one add per buffer, the finite check one reduction and the
hash one pass over contiguous bytes; the swap is a direct ``copy_`` into the model's parameters
(:func:`live_parameters`, :func:`copy_into`). Nothing writes into a buffer once built (no rclpy).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cdcca_ros.core import wire
from cdcca_ros.core.codecs.container import all_finite
from cdcca_ros.errors import DeltaMismatchError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.codecs.container import FlatDelta
    from cdcca_ros.models.base import MLLM


class FlatWeights:
    """One immutable copy of a trainable set, packed in flat buffers (one per dtype/device).

    The tensors are views into the buffers, laid out in sorted-name order, so the
    :func:`~cdcca_ros.core.wire.state_dict_hash` is one pass over contiguous bytes, Eq. 8
    (:meth:`plus`) is one add per buffer and the finite check one reduction per buffer.
    Nothing writes into a buffer once built, so the weights in use, the previous ones (for
    rollback) and a snapshot being persisted share them safely.
    """

    def __init__(self, layout: _Layout, buffers: list[Tensor]) -> None:
        self.layout = layout
        self.buffers = buffers
        self.tensors: dict[str, Tensor] = layout.views(buffers)
        self.tensor_list = list(self.tensors.values())  # in layout (sorted-name) order
        self._hash: str | None = None
        self._norm: float | None = None

    @classmethod
    def pack(cls, sd: Mapping[str, Tensor]) -> FlatWeights:
        """Copy a state dict into flat buffers (dtypes and devices kept)."""
        import torch

        layout = _Layout(sd)
        buffers = [torch.cat([sd[name].detach().reshape(-1) for name in members])
                   for members in layout.members]
        return cls(layout, buffers)

    def plus(self, delta: Mapping[str, Tensor]) -> FlatWeights:
        """Eq. 8 on a copy: bit-identical to :func:`cdcca_ros.core.dwc.apply_delta`.

        Per buffer: the delta's values gathered in layout order, one add in
        ``promote(dtype, float32)``, one cast back -- the same elementwise IEEE operations
        as the per-tensor version.

        Raises:
            DeltaMismatchError: The delta's names, shapes or dtypes do not fit.
        """
        import torch

        layout = self.layout
        if delta.keys() != layout.name_set:
            missing = sorted(layout.name_set - set(delta))[:5]
            extra = sorted(set(delta) - layout.name_set)[:5]
            raise DeltaMismatchError(f'delta names differ from the trainable set: missing '
                                     f'{missing}, unexpected {extra}')
        values = [delta[name] for name in layout.names]
        try:
            shapes_ok = [v.shape for v in values] == layout.shape_list
            dtypes_ok = all(dt.is_floating_point for dt in {v.dtype for v in values})
        except AttributeError:
            shapes_ok = dtypes_ok = False
        if not (shapes_ok and dtypes_ok):
            name, v = next((n, v) for n, v in zip(layout.names, values, strict=True)
                           if not isinstance(v, torch.Tensor) or not v.is_floating_point()
                           or v.shape != layout.shapes[n])
            got = f'{v.dtype} {tuple(v.shape)}' if isinstance(v, torch.Tensor) else \
                type(v).__name__
            raise DeltaMismatchError(f'delta[{name!r}] is {got}, expected a float tensor of '
                                     f'shape {tuple(layout.shapes[name])}')
        out: list[Tensor] = []
        with torch.no_grad():
            for base, (dtype, device), members in zip(self.buffers, layout.groups,
                                                      layout.members, strict=True):
                acc = torch.promote_types(dtype, torch.float32)
                flat = torch.cat([delta[name].reshape(-1) for name in members])
                flat = flat.to(device=device, dtype=acc)
                out.append(base + flat if dtype == acc else (base.to(acc) + flat).to(dtype))
        return FlatWeights(layout, out)

    def plus_flat(self, delta: FlatDelta) -> FlatWeights:
        """:meth:`plus` for a :class:`~cdcca_ros.core.codecs.container.FlatDelta`: one add
        when these weights are one buffer laid out as the delta (the usual case: one dtype, one
        device, names sorted alike), else through :meth:`plus`. Bit-identical either way.

        Raises:
            DeltaMismatchError: The delta's names or shapes do not fit.
        """
        import torch

        layout = self.layout
        if len(self.buffers) != 1 or delta.names != layout.names:
            return self.plus(delta.tensors())
        if tuple(v[2] for v in delta.layout.views) != layout.shape_tuples:
            name = next(n for n, v in zip(layout.names, delta.layout.views, strict=True)
                        if v[2] != tuple(layout.shapes[n]))
            raise DeltaMismatchError(f'delta[{name!r}] has shape {delta.shapes[name]}, '
                                     f'expected {tuple(layout.shapes[name])}')
        (dtype, device), base = layout.groups[0], self.buffers[0]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.no_grad():
            flat = delta.values.to(device=device, dtype=acc)
            out = base + flat if dtype == acc else (base.to(acc) + flat).to(dtype)
        return FlatWeights(layout, [out])

    def first_non_finite(self) -> str | None:
        """Name of the first tensor holding NaN or Inf, or None when all are finite."""
        for buffer, members in zip(self.buffers, self.layout.members, strict=True):
            if not all_finite(buffer):
                return next(name for name in members if not all_finite(self.tensors[name]))
        return None

    def norm(self) -> float:
        """L2 norm of all the weights together (cached)."""
        import torch

        if self._norm is None:
            self._norm = math.sqrt(sum(
                float(torch.linalg.vector_norm(b.detach(), dtype=torch.float64)) ** 2
                for b in self.buffers))
        return self._norm

    def digest(self) -> str:
        """:func:`~cdcca_ros.core.wire.state_dict_hash` of these weights (cached)."""
        import torch

        if self._hash is None:
            raw = [memoryview(b.view(torch.uint8).cpu().numpy()) for b in self.buffers]
            layout = self.layout
            self._hash = wire.hash_tensor_bytes(
                (header, raw[group][start:stop])
                for header, (group, start, stop) in zip(layout.headers, layout.byte_ranges,
                                                        strict=True))
        return self._hash

    def cpu_state_dict(self) -> dict[str, Tensor]:
        """Separate CPU copies of every tensor (for safetensors, which refuses shared memory)."""
        return {name: t.to('cpu', copy=True) for name, t in self.tensors.items()}


class _Layout:
    """Where each tensor of a trainable set sits in :class:`FlatWeights` buffers."""

    def __init__(self, sd: Mapping[str, Tensor]) -> None:
        import torch

        self.names = tuple(sorted(sd))
        self.name_set = frozenset(self.names)
        group_of: dict[tuple[torch.dtype, torch.device], int] = {}
        self.groups: list[tuple[torch.dtype, torch.device]] = []
        self.members: list[list[str]] = []
        self.shapes: dict[str, torch.Size] = {}
        slots: dict[str, tuple[int, int]] = {}  # name -> (group, element offset)
        sizes: list[int] = []
        for name in self.names:
            t = sd[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ModelError(f'trainable tensor {name!r} is not a float tensor')
            key = (t.dtype, t.device)
            if key not in group_of:
                group_of[key] = len(self.groups)
                self.groups.append(key)
                self.members.append([])
                sizes.append(0)
            g = group_of[key]
            slots[name] = (g, sizes[g])
            sizes[g] += t.numel()
            self.members[g].append(name)
            self.shapes[name] = t.shape
        self.shape_list = [self.shapes[name] for name in self.names]
        self.shape_tuples = tuple(tuple(s) for s in self.shape_list)
        self._slots = [(name, *slots[name], tuple(self.shapes[name]),
                        torch.empty(self.shapes[name], device='meta').stride())
                       for name in self.names]
        self.headers = [wire.tensor_hash_header(name, sd[name].dtype, self.shapes[name])
                        for name in self.names]
        self.byte_ranges = []
        for name in self.names:
            g, offset = slots[name]
            size = self.groups[g][0].itemsize
            start = offset * size
            self.byte_ranges.append((g, start, start + sd[name].numel() * size))

    def views(self, buffers: list[Tensor]) -> dict[str, Tensor]:
        """Tensors of the layout as views into ``buffers``."""
        return {name: buffers[g].as_strided(shape, stride, buffers[g].storage_offset() + off)
                for name, g, off, shape, stride in self._slots}


def live_parameters(model: MLLM, weights: FlatWeights) -> list[Tensor] | None:
    """The model's trainable parameters in ``weights``' layout order, for a direct copy.

    None when the model does not expose them (``trainable_parameters``) or they do not match
    the layout exactly; the swap then goes through ``load_trainable_state_dict``.
    """
    get = getattr(model, 'trainable_parameters', None)
    if get is None:
        return None
    params = get()
    layout = weights.layout
    if set(params) != layout.name_set:
        return None
    out = [params[name] for name in layout.names]
    for param, value in zip(out, weights.tensor_list, strict=True):
        if (param.shape, param.dtype, param.device) != (value.shape, value.dtype,
                                                         value.device):
            return None
    return out


def copy_into(params: list[Tensor], weights: FlatWeights) -> None:
    """Copy ``weights`` into ``params`` (same layout order)."""
    import torch

    with torch.no_grad():
        # One fused copy when torch has it (its optimizers use it), else one per tensor.
        foreach_copy = getattr(torch, '_foreach_copy_', None)
        if foreach_copy is not None:
            foreach_copy(params, weights.tensor_list)
        else:  # pragma: no cover - older torch
            for param, value in zip(params, weights.tensor_list, strict=True):
                param.copy_(value)


def update_ratio(delta: Tensor, weights: FlatWeights) -> float:
    """||delta|| / ||weights|| (inf when the weights are all zero and the delta is not)."""
    import torch

    num = float(torch.linalg.vector_norm(delta.detach(), dtype=torch.float64))
    den = weights.norm()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
