"""The model-layer contract: one interface every MLLM family implements.

Images are numpy ``uint8`` RGB arrays ``(H, W, 3)`` at any resolution (the model resizes).
Tensors are torch tensors. This module imports torch only for type checking, so the
dataclasses can be used (e.g. by the transport layer) without loading torch.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import Tensor, nn

QUANTIZATIONS = (None, '4bit', '8bit')


@dataclass
class AnswerResult:
    """One generated answer with its per-step distributions.

    Attributes:
        text: Decoded answer, stripped.
        token_ids: Generated ids (no prompt, no eos).
        step_probs: ``[T, V]`` float32 softmax distribution of every generated step (Eq. 2),
            the step that chose eos included: ``T == len(token_ids) + 1`` when generation
            stopped at eos, ``T == len(token_ids)`` when ``max_new_tokens`` cut it. So
            ``T >= 1`` even for an empty answer.
        token_probs: ``[T]`` probability of each chosen token (eos included, as above).
        latency_ms: Wall time of the call that produced this answer (whole batch).
    """

    text: str
    token_ids: list[int]
    step_probs: np.ndarray
    token_probs: np.ndarray
    latency_ms: float


@dataclass(frozen=True)
class GenerationStep:
    """One step of greedy generation, reported as soon as it is computed (per batch row).

    Attributes:
        index: 0-based step.
        token_ids: The id chosen for each row.
        probabilities: Probability of that id in the step's distribution.
        entropies: Entropy of the step's distribution (nats; Eq. 2 averages these).
        texts: Each row's answer so far, decoded (the end token excluded).
        finished: Whether each row's answer ended at or before this step (end token, or the
            ``max_new_tokens`` limit reached).
    """

    index: int
    token_ids: list[int]
    probabilities: list[float]
    entropies: list[float]
    texts: list[str]
    finished: list[bool]


StepCallback = Callable[[GenerationStep], None]
"""Called after each generated step, before the next is computed; raising
:class:`~cdcca_ros.errors.GenerationCancelled` (or any error) stops generation there."""


@dataclass(frozen=True)
class VisionSpace:
    """What teacher and student must share so the cloud can run both on uplinked tokens.

    Attributes:
        dim: Feature size of one vision token.
        num_tokens: Tokens per image (``N``), CLS included when ``has_cls``.
        grid: Patch grid ``(rows, cols)``.
        has_cls: Whether token 0 is a CLS token.
        encoder: Family/name id of the vision encoder (e.g. ``'blip2-vit:64px-p8-d48'``).
    """

    dim: int
    num_tokens: int
    grid: tuple[int, int]
    has_cls: bool
    encoder: str

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_tokens <= 0:
            raise ConfigError(
                f'VisionSpace dim and num_tokens must be > 0, got dim={self.dim}, '
                f'num_tokens={self.num_tokens}')
        expected = self.grid[0] * self.grid[1] + (1 if self.has_cls else 0)
        if expected != self.num_tokens:
            raise ConfigError(
                f'VisionSpace num_tokens={self.num_tokens} does not match grid={self.grid} '
                f'with has_cls={self.has_cls} (expected {expected})')


@dataclass
class TrainOutputs:
    """One teacher-forced forward pass.

    Attributes:
        loss: Cross-entropy on answer tokens only (labels -100 elsewhere).
        logits: ``[B, S, V]``.
        query: ``[B, L, C]`` Q-Former query outputs (BLIP-2) / projector outputs (LLaVA, Qwen).
        fused: ``[B, A, H]`` LM last hidden states at the answer positions (zero padded):
            entry ``j`` is the position that predicts answer token ``j`` (the last prompt
            position predicts the first answer token; the final eos counts as a token).
        answer_mask: ``[B, A]`` bool, True on real answer positions.
    """

    loss: Tensor
    logits: Tensor
    query: Tensor
    fused: Tensor
    answer_mask: Tensor


@dataclass
class TrainableConfig:
    """Which parameters train: LoRA on the language model plus optional small extras.

    Attributes:
        lora_r: LoRA rank (> 0).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input, in [0, 1).
        lora_targets: Module-name suffixes to adapt; None: the family default
            (LM attention + MLP).
        train_norms: Also train LayerNorm/RMSNorm weights (and biases).
        train_biases: Also train every bias of the model.
        train_query_tokens: Also train the Q-Former query tokens (BLIP-2 only).
        train_embeddings: Also train the language model's token embeddings (tied to its
            output layer in the bundled models): words the student never answered with (a
            new colour, a new object kind) get rows it can learn. Meant for small
            vocabularies; with a real LM's 32k-150k tokens prefer LoRA on ``lm_head``.
        vision_adapter: Hidden width of the vision-side adapter
            (:class:`~cdcca_ros.models.adapters.TokenAdapter`, a residual MLP on every vision
            token before the bridge); 0: none.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    train_norms: bool = True
    train_biases: bool = True
    train_query_tokens: bool = True
    train_embeddings: bool = False
    vision_adapter: int = 0

    def __post_init__(self) -> None:
        if self.lora_r <= 0:
            raise ConfigError(f'TrainableConfig.lora_r must be > 0, got {self.lora_r}')
        if self.lora_alpha <= 0:
            raise ConfigError(f'TrainableConfig.lora_alpha must be > 0, got {self.lora_alpha}')
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(
                f'TrainableConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}')
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str) or not self.lora_targets:
                raise ConfigError(
                    'TrainableConfig.lora_targets must be None or a non-empty tuple of names, '
                    f'got {self.lora_targets!r}')
            self.lora_targets = tuple(self.lora_targets)
        if isinstance(self.vision_adapter, bool) or self.vision_adapter < 0:
            raise ConfigError(f'TrainableConfig.vision_adapter must be an int >= 0, '
                              f'got {self.vision_adapter!r}')

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict."""
        return {
            'lora_r': self.lora_r, 'lora_alpha': self.lora_alpha,
            'lora_dropout': self.lora_dropout,
            'lora_targets': list(self.lora_targets) if self.lora_targets else None,
            'train_norms': self.train_norms, 'train_biases': self.train_biases,
            'train_query_tokens': self.train_query_tokens,
            'train_embeddings': self.train_embeddings,
            'vision_adapter': self.vision_adapter,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainableConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if data.get('lora_targets') is not None:
            data['lora_targets'] = tuple(data['lora_targets'])
        return cls(**data)


class MLLM(abc.ABC):
    """A multimodal LLM behind the interface the device, UTS and cloud code use.

    Attributes:
        family: Registry name of the family (``'blip2'``, ``'llava'``, ``'qwen2_vl'``).
        torch_model: The underlying HF model (``nn.Module``) with peft LoRA layers injected
            in place once :meth:`configure_trainable` ran. Built/loaded in eval mode; a
            trainer calls ``torch_model.train()`` itself (answering always runs in eval mode).
        tokenizer: The HF tokenizer.
        trainable_config: The :class:`TrainableConfig` in force, None before
            :meth:`configure_trainable` (restored by :meth:`load`).
    """

    family: ClassVar[str]
    torch_model: nn.Module
    tokenizer: Any
    trainable_config: TrainableConfig | None = None

    @abc.abstractmethod
    def vision_space(self) -> VisionSpace:
        """Return the vision-token space this model produces and consumes."""

    @abc.abstractmethod
    def vision_tokens(self, images: Sequence[np.ndarray]) -> Tensor:
        """Encode images into the vision tokens that go uplink.

        Args:
            images: uint8 RGB arrays ``(H, W, 3)``, any resolution.

        Returns:
            ``[B, N, D]`` float tensor, ``N, D`` as in :meth:`vision_space`.
        """

    @abc.abstractmethod
    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str],
               max_new_tokens: int = 6) -> list[AnswerResult]:
        """Answer one question per image (greedy, eval mode, deterministic)."""

    @abc.abstractmethod
    def answer_from_tokens(self, tokens: Tensor, indices: Tensor | None,
                           questions: Sequence[str], max_new_tokens: int = 6,
                           on_step: StepCallback | None = None) -> list[AnswerResult]:
        """Answer from (a subset of) vision tokens.

        Args:
            tokens: ``[B, K, D]`` vision tokens.
            indices: ``[B, K]`` long positions in ``0..N-1`` of the kept tokens;
                None means all ``N`` tokens in order (``K == N``).
            questions: One question per row.
            max_new_tokens: Generation limit.
            on_step: Called with each :class:`GenerationStep` as it is generated (streaming);
                an error it raises stops generation and propagates. None: no per-step work.
        """

    def next_token_probs(self, tokens: Tensor, indices: Tensor | None,
                         questions: Sequence[str]) -> Tensor:
        """The first answer step's distribution ``[B, V]`` (float32, eval mode, no grad).

        What one greedy step of :meth:`answer_from_tokens` computes, without generation's
        bookkeeping: the cheapest call that still runs every trainable module (the device's
        probe after a hot-apply). Families override it with a leaner path.
        """
        import torch

        results = self.answer_from_tokens(tokens, indices, questions, max_new_tokens=1)
        return torch.stack([torch.as_tensor(r.step_probs[0], dtype=torch.float32)
                            for r in results])

    @abc.abstractmethod
    def forward_train(self, tokens: Tensor, indices: Tensor | None,
                      questions: Sequence[str], answers: Sequence[str]) -> TrainOutputs:
        """Teacher-forced forward on (a subset of) vision tokens; see :class:`TrainOutputs`.

        The model's train/eval mode is left as the caller set it.
        """

    @abc.abstractmethod
    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int,
                          generator: torch.Generator | None = None) -> Tensor:
        """Monte-Carlo token features for Eq. 3-4 (token variance).

        ``num_masks`` dropout masks (rate ``p``) on the tokens are pushed through a part of
        this model in one batched forward (batch ``M * B``), so the per-token variance is a
        function of the model, not just ``x^2 p / (1 - p)``.

        Returns:
            ``[M, B, N, F]`` float tensor.
        """

    @abc.abstractmethod
    def configure_trainable(self, cfg: TrainableConfig) -> None:
        """Add peft LoRA to the language model and set ``requires_grad`` per ``cfg``."""

    @abc.abstractmethod
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Return CLONED tensors of the trainable set (safe to keep as a backup)."""

    @abc.abstractmethod
    def load_trainable_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load a trainable state dict in place; strict key and shape check (cheap)."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Save config + safetensors weights + tokenizer + ``cdcca.json`` to a directory."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path_or_hub_id: str | Path, quantization: str | None = None,
             device: str = 'cpu') -> MLLM:
        """Load from a directory written by :meth:`save` or a hub id.

        Args:
            path_or_hub_id: Directory or hub id.
            quantization: None, ``'4bit'`` or ``'8bit'`` (bitsandbytes).
            device: Torch device string.
        """
