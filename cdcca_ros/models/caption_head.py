"""A caption decoder beside an MLLM: captions from the same vision tokens the model answers from.

The bundled models were trained to answer questions; their weights (and so their answers) must
not change when they learn to caption. The captioner is therefore a separate small module, a
:class:`CaptionHead` (word embeddings, a causal transformer decoder that cross-attends to the
image, a word classifier), stored beside the model as ``caption_head.safetensors`` +
``caption_head.json`` and trained after it with its own seed
(:mod:`cdcca_ros.sim.train_captions`). What it reads is the model's own view of the image: the
vision tokens as the model's bridge reads them (through the device's token adapter, if any) and
the bridge's output (BLIP-2: the Q-Former's queries, :meth:`HFMLLM.query_features`). Adapting
the model's trainable set (LoRA on the Q-Former, the token adapter) therefore moves its captions
too.

Words are a closed vocabulary (the caption grammar's, :func:`~cdcca_ros.sim.captions.
caption_vocabulary`, plus ``,`` and ``:``), with ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``
first. :meth:`Captioner.caption_from_tokens` decodes greedily and returns
:class:`~cdcca_ros.models.base.AnswerResult` s, whose ``step_probs`` hold every step's
distribution (the eos step included), so UTS stage 1 (Eq. 2) is the mean entropy over the
whole caption with :func:`~cdcca_ros.core.uts.answer_entropy` as it is.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.models.base import MLLM, AnswerResult

HEAD_WEIGHTS = 'caption_head.safetensors'
HEAD_CONFIG = 'caption_head.json'
SPECIALS: tuple[str, ...] = ('<pad>', '<bos>', '<eos>', '<unk>')
PAD, BOS, EOS, UNK = range(len(SPECIALS))
PUNCTUATION: tuple[str, ...] = (',', ':')
_WORDS = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[,:]")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CaptionHeadConfig:
    """Sizes and vocabulary of a :class:`CaptionHead`.

    Attributes:
        words: The vocabulary without the specials (ids start at ``len(SPECIALS)``).
        token_dim: Width of the vision tokens it reads.
        query_dim: Width of the bridge features it reads (0: vision tokens only).
        hidden: Decoder width.
        layers: Decoder layers.
        heads: Attention heads.
        max_length: Longest caption in words (eos not counted).
        dropout: Dropout while training.
        seed: Seed of the initial weights.
    """

    words: tuple[str, ...]
    token_dim: int
    query_dim: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 72
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words) or set(self.words) & set(SPECIALS):
            raise ConfigError('caption head words must be distinct and not special tokens')
        if min(self.token_dim, self.hidden, self.layers, self.heads, self.max_length) < 1 \
                or self.query_dim < 0 or self.hidden % self.heads:
            raise ConfigError(f'caption head sizes are invalid: {self}')
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f'caption head dropout must be in [0, 1), got {self.dropout}')

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.words)


def split_words(text: str) -> list[str]:
    """Lower-case words and the kept punctuation (``,`` ``:``) of a caption."""
    return _WORDS.findall(text.lower())


def build_head(cfg: CaptionHeadConfig) -> Any:
    """A new caption head (a torch module, ``.config`` is ``cfg``) with weights drawn from
    ``cfg.seed``; the global torch generator is left as it was.

    The module class is defined in here so that importing this file does not import torch.
    """
    import torch
    from torch import nn

    class CaptionHead(nn.Module):
        """Causal transformer decoder over ``[vision tokens ; bridge features]``."""

        def __init__(self) -> None:
            super().__init__()
            self.config = cfg
            h = cfg.hidden
            self.embed = nn.Embedding(cfg.vocab_size, h, padding_idx=PAD)
            self.position = nn.Embedding(cfg.max_length + 1, h)
            self.token_proj = nn.Linear(cfg.token_dim, h)
            self.query_proj = nn.Linear(cfg.query_dim, h) if cfg.query_dim else None
            self.memory_norm = nn.LayerNorm(h)
            layer = nn.TransformerDecoderLayer(h, cfg.heads, 4 * h, cfg.dropout,
                                               batch_first=True, norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, cfg.layers)
            self.norm = nn.LayerNorm(h)
            self.out = nn.Linear(h, cfg.vocab_size)

        def memory(self, tokens: Tensor, query: Tensor | None) -> Tensor:
            parts = [self.token_proj(tokens)]
            if self.query_proj is not None:
                if query is None:
                    raise ConfigError('this caption head reads bridge features; none given')
                parts.append(self.query_proj(query))
            return self.memory_norm(torch.cat(parts, dim=1))

        def forward(self, memory: Tensor, ids: Tensor) -> Tensor:
            """Logits ``[B, T, V]`` of the next word after each of ``ids`` ``[B, T]``."""
            return self.out(self.hidden(memory, ids))

        def hidden(self, memory: Tensor, ids: Tensor) -> Tensor:
            """Final (normed) hidden states ``[B, T, H]`` at each of ``ids`` ``[B, T]``."""
            steps = ids.shape[1]
            x = self.embed(ids) + self.position(torch.arange(steps, device=ids.device))
            causal = torch.triu(torch.ones(steps, steps, dtype=torch.bool, device=ids.device),
                                diagonal=1)
            hidden = self.decoder(x, memory, tgt_mask=causal,
                                  tgt_key_padding_mask=ids == PAD)
            return self.norm(hidden)

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return CaptionHead()
    finally:
        torch.random.set_rng_state(generator_state)


def encode_caption(cfg: CaptionHeadConfig, text: str) -> list[int]:
    """Word ids of ``text`` followed by eos (unknown words: ``<unk>``), at most
    ``max_length`` words."""
    index = {w: i + len(SPECIALS) for i, w in enumerate(cfg.words)}
    ids = [index.get(w, UNK) for w in split_words(text)][:cfg.max_length]
    return ids + [EOS]


def decode_caption(cfg: CaptionHeadConfig, ids: Sequence[int]) -> str:
    """Text of word ids (up to the first eos; specials dropped), ``,``/``:`` attached."""
    words = []
    for i in ids:
        if i == EOS:
            break
        if i >= len(SPECIALS):
            words.append(cfg.words[i - len(SPECIALS)])
    return re.sub(r' ([,:])', r'\1', ' '.join(words))


def save_head(head: Any, path: str | Path) -> None:
    """Write ``caption_head.safetensors`` and ``caption_head.json`` into directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(path / HEAD_WEIGHTS))
    meta = {'format_version': FORMAT_VERSION, **asdict(head.config)}
    (path / HEAD_CONFIG).write_text(json.dumps(meta, indent=1) + '\n')


def has_head(path: str | Path) -> bool:
    """Whether directory ``path`` holds a caption head."""
    return (Path(path) / HEAD_CONFIG).is_file() and (Path(path) / HEAD_WEIGHTS).is_file()


def load_head(path: str | Path) -> Any:
    """Load the caption head stored in directory ``path`` (weights only, no pickle).

    Raises:
        ModelLoadError: Missing or unreadable files, another format version, a shape mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not has_head(path):
        raise ModelLoadError(f'no caption head in {path} ({HEAD_CONFIG} + {HEAD_WEIGHTS}); '
                             '`make models` trains one for the bundled models')
    try:
        meta = json.loads((path / HEAD_CONFIG).read_text())
        version = meta.pop('format_version', None)
        if version != FORMAT_VERSION:
            raise ModelLoadError(f'{path / HEAD_CONFIG}: format_version {version!r}, '
                                 f'expected {FORMAT_VERSION}')
        cfg = CaptionHeadConfig(**{**meta, 'words': tuple(meta['words'])})
        head = build_head(cfg)
        head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    except ModelLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f'caption head in {path} does not load: {err}') from err
    head.eval()
    return head


class Captioner:
    """An MLLM and its caption head: captions of images or of (kept) vision tokens.

    Args:
        model: The MLLM whose vision tokens (and bridge features) the head reads.
        head: A caption head built for this model's feature widths.
    """

    def __init__(self, model: MLLM, head: Any) -> None:
        self.model = model
        self.head = head
        self.config: CaptionHeadConfig = head.config

    @classmethod
    def load(cls, model: MLLM, path: str | Path) -> Captioner:
        """The model with the head stored in ``path`` (usually the model's directory)."""
        return cls(model, load_head(path))

    def features(self, tokens: Tensor, indices: Tensor | None = None, grad: bool = False
                 ) -> tuple[Tensor, Tensor | None]:
        """What the head reads: adapted vision tokens and the bridge's output (``grad``: with
        gradients, in the model's current mode)."""
        query = (self.model.query_features(tokens, indices, grad=grad)
                 if self.config.query_dim else None)
        return self.model.adapted_tokens(tokens, indices, grad=grad), query

    def memory(self, tokens: Tensor, indices: Tensor | None = None, grad: bool = False
               ) -> tuple[Tensor, Tensor | None]:
        """``(memory the decoder attends to, bridge features)`` of vision tokens."""
        vis, query = self.features(tokens, indices, grad)
        return (self.head.memory(vis.float(), None if query is None else query.float()),
                query)

    def caption(self, images: Sequence[np.ndarray], max_length: int | None = None
                ) -> list[AnswerResult]:
        """Captions of ``images`` (see :meth:`caption_from_tokens`)."""
        start = time.perf_counter()
        tokens = self.model.vision_tokens(images)
        return self._generate(tokens, None, max_length, start)

    def caption_from_tokens(self, tokens: Tensor, indices: Tensor | None = None,
                            max_length: int | None = None) -> list[AnswerResult]:
        """Greedy captions of vision tokens ``[B, N, D]`` (``indices``: kept tokens).

        Returns:
            One :class:`AnswerResult` per row: ``step_probs`` ``[T, V]`` over the head's
            vocabulary, the eos step included: ``T = words + 1`` (at ``max_length`` words,
            the last row is the step that should have ended the caption).
        """
        return self._generate(tokens, indices, max_length, time.perf_counter())

    def _generate(self, tokens: Tensor, indices: Tensor | None, max_length: int | None,
                  start: float) -> list[AnswerResult]:
        import torch

        from cdcca_ros.models.base import AnswerResult

        limit = self.config.max_length if max_length is None else int(max_length)
        if not 1 <= limit <= self.config.max_length:
            raise ConfigError(f'max_length must be in [1, {self.config.max_length}], '
                              f'got {max_length}')
        was_training = self.head.training
        self.head.eval()
        try:
            with torch.no_grad():
                memory, _ = self.memory(tokens, indices)
                batch = memory.shape[0]
                ids = torch.full((batch, 1), BOS, dtype=torch.long, device=memory.device)
                steps = []
                done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
                for _ in range(limit + 1):
                    probs = torch.softmax(self.head(memory, ids)[:, -1].float(), dim=-1)
                    token = probs.argmax(dim=-1)
                    token = torch.where(done, torch.full_like(token, PAD), token)
                    steps.append(probs)
                    ids = torch.cat([ids, token[:, None]], dim=1)
                    done |= token == EOS
                    if bool(done.all()):
                        break
        finally:
            self.head.train(was_training)
        latency_ms = (time.perf_counter() - start) * 1000.0
        probs_np = torch.stack(steps, dim=1).cpu().numpy()
        out = []
        for b in range(batch):
            row = [int(t) for t in ids[b, 1:]]
            # at most `limit` words; the step after the last word (eos, or where it should
            # have been) always counts
            length = min(row.index(EOS) if EOS in row else len(row), limit)
            kept = length + 1
            step_probs = np.ascontiguousarray(probs_np[b, :kept], dtype=np.float32)
            out.append(AnswerResult(
                text=decode_caption(self.config, row[:length]), token_ids=row[:length],
                step_probs=step_probs, token_probs=step_probs[np.arange(kept), row[:kept]],
                latency_ms=latency_ms))
        return out


__all__ = ['HEAD_WEIGHTS', 'HEAD_CONFIG', 'SPECIALS', 'PUNCTUATION', 'CaptionHeadConfig',
           'build_head', 'Captioner', 'split_words', 'encode_caption', 'decode_caption',
           'save_head', 'load_head', 'has_head']
