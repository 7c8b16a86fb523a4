"""Machinery shared by the transformers-backed families.

A family module subclasses :class:`HFMLLM` and provides the vision side (preprocessing,
vision tokens, tokens -> LM image embeddings, Monte-Carlo features) and a few names; this
module does the text side once for all: prompt layout with left padding, a greedy decoder
with a KV cache that records every step's distribution, teacher-forced training outputs,
LoRA set-up through peft, trainable state dicts, and save/load.

Importing this module imports torch and transformers; the registry imports it lazily.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import operator
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cdcca_ros.errors import ConfigError, ModelError, ModelLoadError, PromptTooLongError
from cdcca_ros.models.base import (
    MLLM,
    QUANTIZATIONS,
    AnswerResult,
    GenerationStep,
    StepCallback,
    TrainableConfig,
    TrainOutputs,
    VisionSpace,
)

CDCCA_JSON = 'cdcca.json'
TRAINABLE_FILE = 'trainable.safetensors'
FORMAT_VERSION = 1
DEFAULT_PROMPT = 'Question: {question} Answer:'
_PROMPT_CACHE_SIZE = 4096
# Bytes of question strings and token ids the prompt cache holds at most (an estimate:
# sys.getsizeof of both, 32 bytes per id object); larger questions are not cached.
_PROMPT_CACHE_BYTES = 4 << 20
_PROMPT_CACHE_ENTRY_BYTES = 64 << 10
# A question longer than this many characters per token of context cannot fit: refused
# before it is tokenized. And never more than MAX_QUESTION_CHARS.
_MAX_CHARS_PER_TOKEN = 64
MAX_QUESTION_CHARS = 65536


@dataclass
class _Batch:
    """One left-padded LM input: ids, mask, positions, and where answers sit."""

    input_ids: Tensor        # [B, S]
    attention_mask: Tensor   # [B, S] long
    position_ids: Tensor     # [B, S] or [3, B, S] (Qwen2-VL mrope)
    labels: Tensor | None    # [B, S], -100 outside answer tokens (training only)
    answer_lengths: list[int]  # answer tokens + eos per row (training only)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block in eval mode and no-grad, restoring the previous mode after."""
    was_training = module.training
    if was_training:  # eval() walks every submodule: skip it when there is nothing to do
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()


def fingerprint(tensors: Sequence[Tensor], max_elems: int = 4096) -> str:
    """Short hash over the first ``max_elems`` values of each tensor (float32 bytes).

    Cheap even for a billion-parameter ViT, and enough to tell two different encoders of
    the same shape apart.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)[:max_elems].to('cpu', torch.float32)
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:12]


class HFMLLM(MLLM):
    """Base of the families built on a transformers image-text-to-text model.

    Subclasses set the class attributes and implement the ``_``-prefixed hooks.
    """

    family: ClassVar[str]
    hf_class_name: ClassVar[str]               # transformers class used to (re)load
    default_lora_targets: ClassVar[tuple[str, ...]]
    lm_prefix: ClassVar[str]                   # module path of the language model
    shared_vision_prefixes: ClassVar[tuple[str, ...]]  # never trained, never quantized
    vision_not_shared_prefixes: ClassVar[tuple[str, ...]] = ()  # exceptions to the above
    quant_skip_modules: ClassVar[tuple[str, ...]]

    def __init__(self, torch_model: nn.Module, tokenizer: Any, image_processor: Any,
                 prompt_template: str = DEFAULT_PROMPT) -> None:
        if '{question}' not in prompt_template:
            raise ConfigError(
                f'prompt_template must contain {{question}}, got {prompt_template!r}')
        self.torch_model = torch_model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_template = prompt_template
        self.trainable_config: TrainableConfig | None = None
        self._trainable: dict[str, nn.Parameter] = {}
        self._prompt_cache: dict[str, list[int]] = {}
        self.prompt_cache_bytes = 0
        # next_token_probs inputs by (image embeddings, questions): a device probes the same
        # question after every update. Tensors in it are never written to.
        self._probe_batches: dict[tuple[int, tuple[str, ...]], _Batch] = {}
        self._vision_space: VisionSpace | None = None
        self._vision_key: tuple[tuple[int, int], ...] = ()
        self.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        if self.eos_token_id is None:
            raise ModelError(f'{self.family}: the tokenizer has no eos token')
        self.torch_model.eval()

    # ---------------------------------------------------------------- family hooks
    def _pixel_batch(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """Preprocess images into the vision encoder's inputs."""
        raise NotImplementedError

    def _encode(self, pixels: dict[str, Tensor]) -> Tensor:
        """Vision encoder: pixel inputs -> ``[B, N, D]`` vision tokens."""
        raise NotImplementedError

    def _image_embeds(self, tokens: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor]:
        """Kept vision tokens -> (LM image embeddings ``[B, L, H]``, query ``[B, L', C]``)."""
        raise NotImplementedError

    def _vision_space_raw(self) -> tuple[int, int, tuple[int, int], bool, str]:
        """(dim, num_tokens, grid, has_cls, encoder name without fingerprint)."""
        raise NotImplementedError

    def _vision_modules(self) -> list[nn.Module]:
        """Modules whose weights define the vision-token space (for the fingerprint)."""
        raise NotImplementedError

    def _image_placeholder_ids(self, num: int) -> list[int]:
        """Token ids standing for ``num`` image embeddings (plus any wrapping tokens)."""
        return [self.image_token_id] * num

    def _sequence(self, image_ids: list[int], prompt_ids: list[int]) -> list[int]:
        """Layout of one prompt: ``<s> <image>*L question`` by default."""
        head = [self.bos_token_id] if self.bos_token_id is not None else []
        return head + image_ids + prompt_ids

    def _position_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """1-D positions that skip the left padding."""
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def image_token_id(self) -> int:
        """Id of the placeholder the image embeddings replace."""
        return int(self.torch_model.config.image_token_id)

    @property
    def decoder(self) -> nn.Module:
        """The language model body (returns ``last_hidden_state``, takes a KV cache)."""
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary."""
        return self.torch_model.get_output_embeddings()

    @property
    def context_length(self) -> int | None:
        """Longest token sequence the language model takes (None: unknown)."""
        n = getattr(self.text_config, 'max_position_embeddings', None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def text_config(self) -> Any:
        """Config of the language model (for the KV cache)."""
        return self.torch_model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.torch_model.parameters()).device

    # ---------------------------------------------------------------- vision side
    def vision_space(self) -> VisionSpace:
        """The vision space; ``encoder`` ends in a fingerprint of the encoder's weights.

        Recomputed whenever a vision weight changed in place (tensor version counters), so
        a teacher whose ViT was trained further no longer matches an old student.
        """
        params = [p for m in self._vision_modules() for p in m.parameters()]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._vision_space is None or key != self._vision_key:
            dim, num, grid, has_cls, name = self._vision_space_raw()
            self._vision_space = VisionSpace(
                dim=dim, num_tokens=num, grid=grid, has_cls=has_cls,
                encoder=f'{name}#{fingerprint(params)}')
            self._vision_key = key
        return self._vision_space

    def vision_tokens(self, images: Sequence[np.ndarray]) -> Tensor:
        self._check_images(images)
        with eval_mode(self.torch_model):
            return self._encode(self._pixel_batch(images))

    def _check_images(self, images: Sequence[np.ndarray]) -> None:
        if len(images) == 0:
            raise ModelError(f'{self.family}: no images given')
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 \
                    or img.dtype != np.uint8:
                desc = (f'{type(img).__name__} {getattr(img, "shape", None)} '
                        f'{getattr(img, "dtype", None)}')
                raise ModelError(
                    f'{self.family}: image {i} must be a uint8 RGB array (H, W, 3), got {desc}')

    def _check_tokens(self, tokens: Tensor, indices: Tensor | None, batch: int) -> Tensor:
        """Validate ``tokens``/``indices``; return tokens on the model's device and dtype."""
        dim, num_tokens = self._vision_space_raw()[:2]
        if tokens.ndim != 3 or tokens.shape[2] != dim:
            raise ModelError(
                f'{self.family}: tokens must be [B, K, {dim}], got {tuple(tokens.shape)}')
        if tokens.shape[0] != batch:
            raise ModelError(
                f'{self.family}: {tokens.shape[0]} token rows for {batch} questions')
        if indices is None:
            if tokens.shape[1] != num_tokens:
                raise ModelError(
                    f'{self.family}: indices=None needs all {num_tokens} tokens, '
                    f'got {tokens.shape[1]}')
        else:
            if tuple(indices.shape) != tuple(tokens.shape[:2]):
                raise ModelError(
                    f'{self.family}: indices shape {tuple(indices.shape)} does not match '
                    f'tokens {tuple(tokens.shape[:2])}')
            if indices.numel() and (int(indices.min()) < 0
                                    or int(indices.max()) >= num_tokens):
                raise ModelError(
                    f'{self.family}: indices must lie in 0..{num_tokens - 1}, got '
                    f'{int(indices.min())}..{int(indices.max())}')
            if tokens.shape[1] == 0:
                raise ModelError(f'{self.family}: at least one token must be kept')
        dtype = self._vision_dtype()
        return tokens.to(self.device, dtype)

    def _vision_dtype(self) -> torch.dtype:
        return next(self._vision_modules()[0].parameters()).dtype

    # ---------------------------------------------------------------- text side
    def _prompt_ids(self, question: str) -> list[int]:
        ids = self._prompt_cache.get(question)
        if ids is not None:
            return ids
        ctx = self.context_length
        limit = min(MAX_QUESTION_CHARS, (ctx or MAX_QUESTION_CHARS) * _MAX_CHARS_PER_TOKEN)
        if len(question) > limit:
            raise PromptTooLongError(
                f'{self.family}: a question of {len(question)} characters cannot fit the '
                f'language model\'s context of {ctx} tokens (at most {limit} characters)')
        text = self.prompt_template.format(question=question)
        ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
        cost = _prompt_cost(question, ids)
        if cost <= _PROMPT_CACHE_ENTRY_BYTES and (ctx is None or len(ids) < ctx):
            cache = self._prompt_cache
            while cache and (len(cache) >= _PROMPT_CACHE_SIZE
                             or self.prompt_cache_bytes + cost > _PROMPT_CACHE_BYTES):
                oldest = next(iter(cache))
                self.prompt_cache_bytes -= _prompt_cost(oldest, cache.pop(oldest))
            cache[question] = ids
            self.prompt_cache_bytes += cost
        return ids

    def _build_batch(self, num_image: int, questions: Sequence[str],
                     answers: Sequence[str] | None = None, reserve: int = 0) -> _Batch:
        """Left-padded ids of the prompts (and answers, for training).

        Raises:
            PromptTooLongError: A row, plus ``reserve`` tokens to generate, is longer than
                the language model's context.
        """
        image_ids = self._image_placeholder_ids(num_image)
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        answer_lengths: list[int] = []
        for i, question in enumerate(questions):
            ids = self._sequence(image_ids, self._prompt_ids(question))
            labels = [-100] * len(ids)
            if answers is not None:
                ans = self.tokenizer(' ' + answers[i], add_special_tokens=False)['input_ids']
                ans = list(ans) + [self.eos_token_id]
                ids = ids + ans
                labels = labels + ans
                answer_lengths.append(len(ans))
            rows.append(ids)
            label_rows.append(labels)
        width = max(len(r) for r in rows)
        ctx = self.context_length
        if ctx is not None and width + reserve > ctx:
            raise PromptTooLongError(
                f'{self.family}: a prompt of {width} tokens (image tokens, question, choices)'
                f'{f" plus {reserve} to generate" if reserve else ""} does not fit the '
                f'language model\'s context of {ctx} tokens')
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels_t = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(zip(rows, label_rows, strict=True)):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
            labels_t[i, width - len(ids):] = torch.tensor(labels)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return _Batch(input_ids=input_ids, attention_mask=mask,
                      position_ids=self._position_ids(input_ids, mask),
                      labels=labels_t.to(self.device) if answers is not None else None,
                      answer_lengths=answer_lengths)

    def _inputs_embeds(self, batch: _Batch, image_embeds: Tensor) -> Tensor:
        embed = self.torch_model.get_input_embeddings()
        embeds = embed(batch.input_ids)
        image_mask = (batch.input_ids == self.image_token_id).unsqueeze(-1)
        expected = image_embeds.shape[0] * image_embeds.shape[1]
        if int(image_mask.sum()) != expected:
            raise ModelError(
                f'{self.family}: {int(image_mask.sum())} image placeholders for '
                f'{expected} image embeddings')
        return embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))

    def _run_decoder(self, embeds: Tensor, mask: Tensor, positions: Tensor,
                     cache: Any = None) -> Tensor:
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    # ---------------------------------------------------------------- answering
    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str],
               max_new_tokens: int = 6) -> list[AnswerResult]:
        start = time.perf_counter()
        if len(images) != len(questions):
            raise ModelError(
                f'{self.family}: {len(images)} images for {len(questions)} questions')
        tokens = self.vision_tokens(images)
        return self._answer(tokens, None, questions, max_new_tokens, start)

    def answer_from_tokens(self, tokens: Tensor, indices: Tensor | None,
                           questions: Sequence[str], max_new_tokens: int = 6,
                           on_step: StepCallback | None = None) -> list[AnswerResult]:
        return self._answer(tokens, indices, questions, max_new_tokens, time.perf_counter(),
                            on_step)

    def _answer(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                max_new_tokens: int, start: float,
                on_step: StepCallback | None = None) -> list[AnswerResult]:
        if max_new_tokens < 1:
            raise ConfigError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
        tokens = self._check_tokens(tokens, indices, len(questions))
        with eval_mode(self.torch_model):
            image_embeds, _ = self._image_embeds(self._adapt(tokens), indices)
            batch = self._build_batch(image_embeds.shape[1], questions,
                                      reserve=max_new_tokens)
            embeds = self._inputs_embeds(batch, image_embeds)
            steps, chosen = self._greedy(embeds, batch.attention_mask, batch.position_ids,
                                         max_new_tokens, on_step)
        latency_ms = (time.perf_counter() - start) * 1000.0
        probs = torch.stack(steps, dim=1).cpu().numpy()   # [B, T, V]
        ids = torch.stack(chosen, dim=1).cpu().numpy()    # [B, T]
        results = []
        for b in range(len(questions)):
            row = [int(t) for t in ids[b]]
            length = row.index(self.eos_token_id) if self.eos_token_id in row else len(row)
            # The eos step is kept: how sure the model was to stop matters for Eq. 2, and an
            # empty answer still has one distribution.
            steps_kept = min(length + 1, len(row))
            step_probs = np.ascontiguousarray(probs[b, :steps_kept], dtype=np.float32)
            token_ids = row[:length]
            results.append(AnswerResult(
                text=self.tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
                token_ids=token_ids, step_probs=step_probs,
                token_probs=step_probs[np.arange(steps_kept), row[:steps_kept]],
                latency_ms=latency_ms))
        return results

    def adapted_tokens(self, tokens: Tensor, indices: Tensor | None = None,
                       grad: bool = False) -> Tensor:
        """The vision tokens ``[B, K, D]`` as the bridge reads them (through the token adapter,
        if any); what a caption head reads. In eval mode without gradients, unless ``grad``
        (then in the model's current mode, for training)."""
        tokens = self._check_tokens(tokens, indices, tokens.shape[0])
        if grad:
            return self._adapt(tokens)
        with eval_mode(self.torch_model):
            return self._adapt(tokens)

    def query_features(self, tokens: Tensor, indices: Tensor | None = None,
                       grad: bool = False) -> Tensor:
        """The bridge's output over (adapted) vision tokens, ``[B, L, C]`` (BLIP-2: the
        Q-Former's queries); what a caption head reads beside the tokens. In eval mode without
        gradients, unless ``grad`` (then in the model's current mode, for training)."""
        tokens = self._check_tokens(tokens, indices, tokens.shape[0])
        if grad:
            return self._image_embeds(self._adapt(tokens), indices)[1]
        with eval_mode(self.torch_model):
            return self._image_embeds(self._adapt(tokens), indices)[1]

    def next_token_probs(self, tokens: Tensor, indices: Tensor | None,
                         questions: Sequence[str]) -> Tensor:
        # One decoder pass without a KV cache, token ids or text: the first step of _greedy.
        tokens = self._check_tokens(tokens, indices, len(questions))
        with eval_mode(self.torch_model):
            image_embeds, _ = self._image_embeds(self._adapt(tokens), indices)
            key = (int(image_embeds.shape[1]), tuple(questions))
            batch = self._probe_batches.get(key)
            if batch is None:
                batch = self._build_batch(key[0], questions)
                if len(self._probe_batches) >= 8:
                    self._probe_batches.clear()
                self._probe_batches[key] = batch
            embeds = self._inputs_embeds(batch, image_embeds)
            hidden = self._run_decoder(embeds, batch.attention_mask, batch.position_ids)
            return torch.softmax(self.lm_head(hidden[:, -1]).float(), dim=-1)

    def _greedy(self, embeds: Tensor, mask: Tensor, positions: Tensor,
                max_new_tokens: int, on_step: StepCallback | None = None
                ) -> tuple[list[Tensor], list[Tensor]]:
        """Greedy decoding with a KV cache; returns per-step softmax and chosen ids.

        ``on_step`` (streaming) gets each step before the next one is computed; without it the
        loop does no per-step work beyond decoding.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        embed = self.torch_model.get_input_embeddings()
        hidden = self._run_decoder(embeds, mask, positions, cache)
        steps: list[Tensor] = []
        chosen: list[Tensor] = []
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        next_pos = positions[..., -1:] + 1
        for step in range(max_new_tokens):
            logits = self.lm_head(hidden[:, -1]).float()
            probs = torch.softmax(logits, dim=-1)
            token = probs.argmax(dim=-1)
            steps.append(probs)
            chosen.append(token)
            done |= token == self.eos_token_id
            last = bool(done.all()) or step == max_new_tokens - 1
            if on_step is not None:
                on_step(self._step_report(step, probs, token, chosen, done, last))
            if last:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            hidden = self._run_decoder(embed(token[:, None]), mask, next_pos, cache)
            next_pos = next_pos + 1
        return steps, chosen

    def _step_report(self, step: int, probs: Tensor, token: Tensor, chosen: list[Tensor],
                     done: Tensor, last: bool) -> GenerationStep:
        """What ``on_step`` gets: each row's chosen token, its probability, the step's
        entropy and the answer decoded so far (up to its end token)."""
        ids = torch.stack(chosen, dim=1).tolist()
        texts = []
        for row in ids:
            row = row[:row.index(self.eos_token_id)] if self.eos_token_id in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return GenerationStep(
            index=step, token_ids=token.tolist(),
            probabilities=probs.gather(1, token[:, None])[:, 0].tolist(),
            entropies=torch.special.entr(probs).sum(dim=-1).tolist(), texts=texts,
            finished=[bool(d) or last for d in done.tolist()])

    # ---------------------------------------------------------------- training
    def forward_train(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                      answers: Sequence[str]) -> TrainOutputs:
        if len(answers) != len(questions):
            raise ModelError(
                f'{self.family}: {len(answers)} answers for {len(questions)} questions')
        tokens = self._check_tokens(tokens, indices, len(questions))
        image_embeds, query = self._image_embeds(self._adapt(tokens), indices)
        batch = self._build_batch(image_embeds.shape[1], questions, answers)
        embeds = self._inputs_embeds(batch, image_embeds)
        hidden = self._run_decoder(embeds, batch.attention_mask, batch.position_ids)
        logits = self.lm_head(hidden)
        assert batch.labels is not None
        # Position t predicts token t + 1; only answer tokens (and eos) carry labels.
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        # With left padding every row ends at S - 1; the a answer tokens of a row are
        # predicted from positions S - a - 1 .. S - 2.
        seq, width = hidden.shape[1], max(batch.answer_lengths)
        fused = hidden.new_zeros((hidden.shape[0], width, hidden.shape[2]))
        answer_mask = torch.zeros((hidden.shape[0], width), dtype=torch.bool,
                                  device=hidden.device)
        for b, length in enumerate(batch.answer_lengths):
            fused[b, :length] = hidden[b, seq - length - 1:seq - 1]
            answer_mask[b, :length] = True
        return TrainOutputs(loss=loss, logits=logits, query=query, fused=fused,
                            answer_mask=answer_mask)

    # ---------------------------------------------------------------- trainable set
    def _is_shared_vision(self, name: str) -> bool:
        if any(name.startswith(p) for p in self.vision_not_shared_prefixes):
            return False
        return any(name.startswith(p) for p in self.shared_vision_prefixes)

    def _lora_module_names(self, targets: tuple[str, ...], explicit: bool) -> list[str]:
        names = []
        for name, module in self.torch_model.named_modules():
            if not isinstance(module, nn.Linear) or name.rsplit('.', 1)[-1] not in targets:
                continue
            if self._is_shared_vision(name + '.'):
                continue
            if not explicit and not name.startswith(self.lm_prefix + '.'):
                continue
            names.append(name)
        return names

    def configure_trainable(self, cfg: TrainableConfig) -> None:
        """Add LoRA (peft) and set ``requires_grad``; the shared vision encoder stays frozen.

        LoRA goes on the language model's ``cfg.lora_targets`` (family default: attention
        and MLP projections). Explicit targets may also name modules outside the language
        model (e.g. the Q-Former's ``query``/``key``/``value``) but never inside the shared
        vision encoder: teacher and student must keep producing the same tokens.

        Raises:
            ModelError: LoRA is already configured differently, or no module matches.
        """
        from peft import LoraConfig, inject_adapter_in_model

        if self.trainable_config is not None:
            old, new = self.trainable_config, cfg
            if (old.lora_r, old.lora_alpha, old.lora_dropout, old.lora_targets,
                    old.vision_adapter) != (new.lora_r, new.lora_alpha, new.lora_dropout,
                                            new.lora_targets, new.vision_adapter):
                raise ModelError(
                    f'{self.family}: LoRA already configured as {old}; cannot change to {new}')
        else:
            explicit = cfg.lora_targets is not None
            targets = cfg.lora_targets if explicit else self.default_lora_targets
            names = self._lora_module_names(tuple(targets), explicit)
            if not names:
                raise ModelError(
                    f'{self.family}: no linear module matches lora_targets={targets!r}')
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=names, bias='none')
            # A fixed seed: the same base gets the same LoRA A matrices on cloud and device.
            seeded(0, lambda: inject_adapter_in_model(lora, self.torch_model))
            if cfg.vision_adapter:
                self._add_token_adapter(cfg.vision_adapter)
        self.trainable_config = cfg
        for name, param in self.torch_model.named_parameters():
            param.requires_grad_(self._wants_grad(name, cfg))
        self._trainable = {n: p for n, p in self.torch_model.named_parameters()
                           if p.requires_grad}

    def _add_token_adapter(self, hidden: int) -> None:
        """Attach the vision-side adapter (seeded, identity at start) to the torch model."""
        from cdcca_ros.models.adapters import TOKEN_ADAPTER, build_token_adapter

        dim = self.vision_space().dim
        param = next(self.torch_model.parameters())
        adapter = build_token_adapter(dim, hidden, seed=0, device=param.device,
                                      dtype=torch.float32)
        self.torch_model.add_module(TOKEN_ADAPTER, adapter)

    @property
    def token_adapter(self) -> nn.Module | None:
        """The vision-side adapter, None when the trainable set has none."""
        from cdcca_ros.models.adapters import TOKEN_ADAPTER

        return getattr(self.torch_model, TOKEN_ADAPTER, None)

    def _adapt(self, tokens: Tensor) -> Tensor:
        """The vision tokens as the bridge reads them (through the adapter, if any)."""
        adapter = self.token_adapter
        return tokens if adapter is None else adapter(tokens)

    def _wants_grad(self, name: str, cfg: TrainableConfig) -> bool:
        from cdcca_ros.models.adapters import TOKEN_ADAPTER

        if 'lora_' in name or name.startswith(TOKEN_ADAPTER + '.'):
            return True
        if self._is_shared_vision(name):
            return False
        if cfg.train_biases and name.endswith('.bias'):
            return True
        if cfg.train_embeddings and self._is_embedding_param(name):
            return True
        if cfg.train_norms and self._is_norm_param(name):
            return True
        return cfg.train_query_tokens and name == 'query_tokens'

    def _is_embedding_param(self, name: str) -> bool:
        """Whether ``name`` is the language model's input token embedding (tied to the
        output layer where the model ties them)."""
        embedding = self.torch_model.get_input_embeddings()
        weight = getattr(embedding, 'weight', None)
        if weight is None:  # peft wrapped it: the base layer holds the weight
            weight = getattr(getattr(embedding, 'base_layer', None), 'weight', None)
        params = getattr(self, '_params_by_name', None)
        if params is None:
            params = self._params_by_name = dict(self.torch_model.named_parameters())
        return weight is not None and params.get(name) is weight

    def _is_norm_param(self, name: str) -> bool:
        if '.' not in name:
            return False
        module = self.torch_model.get_submodule(name.rsplit('.', 1)[0])
        return 'norm' in type(module).__name__.lower()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The live trainable parameters by name (for an optimizer)."""
        self._require_trainable()
        return dict(self._trainable)

    def _require_trainable(self) -> None:
        if self.trainable_config is None:
            raise ModelError(f'{self.family}: call configure_trainable() first')

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Cloned trainable tensors keyed by parameter name (LoRA keys carry ``.default.``)."""
        self._require_trainable()
        return {n: p.detach().clone() for n, p in self._trainable.items()}

    def load_trainable_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copy ``sd`` into the trainable parameters after a strict key/shape check.

        A direct ``copy_`` into the cached parameters: exact, allocation-free and far
        cheaper than peft's ``set_peft_model_state_dict`` (which renames keys and goes
        through ``load_state_dict``), so it suits hot-apply between two answers.
        """
        self._require_trainable()
        missing = sorted(set(self._trainable) - set(sd))
        unexpected = sorted(set(sd) - set(self._trainable))
        if missing or unexpected:
            raise ModelError(
                f'{self.family}: trainable state dict keys differ: missing {missing[:5]} '
                f'({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})')
        for name, value in sd.items():
            param = self._trainable[name]
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(param.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                raise ModelError(
                    f'{self.family}: trainable tensor {name!r} has shape {shape}, '
                    f'expected {tuple(param.shape)}')
            if not value.is_floating_point():
                raise ModelError(
                    f'{self.family}: trainable tensor {name!r} has dtype {value.dtype}, '
                    'expected a floating point dtype')
        with torch.no_grad():
            for name, value in sd.items():
                self._trainable[name].copy_(value)

    # ---------------------------------------------------------------- save / load
    def _base_state_dict(self) -> dict[str, Tensor]:
        """The model's weights without LoRA, under the original (pre-peft) names."""
        from cdcca_ros.models.adapters import TOKEN_ADAPTER

        out = {}
        for name, tensor in self.torch_model.state_dict().items():
            if 'lora_' in name or name.startswith(TOKEN_ADAPTER + '.'):
                continue
            out[name.replace('.base_layer.', '.')] = tensor
        return out

    def _meta(self) -> dict[str, Any]:
        return {
            'format_version': FORMAT_VERSION,
            'family': self.family,
            'vision_space': asdict(self.vision_space()),
            'trainable': self.trainable_config.to_dict() if self.trainable_config else None,
            'prompt_template': self.prompt_template,
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if getattr(self.torch_model, 'is_quantized', False):
            raise ModelError(f'{self.family}: saving a quantized model is not supported')
        self.torch_model.save_pretrained(str(path), state_dict=self._base_state_dict())
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        if self.trainable_config is not None:
            save_file({k: v.contiguous() for k, v in self.trainable_state_dict().items()},
                      str(path / TRAINABLE_FILE))
        (path / CDCCA_JSON).write_text(json.dumps(self._meta(), indent=2) + '\n')

    @classmethod
    def _image_processor_class(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def _prepare_image_processor(cls, image_processor: Any) -> Any:
        """Adjust a loaded image processor (e.g. pin a fixed resolution); identity here."""
        return image_processor

    @classmethod
    def load(cls, path_or_hub_id: str | Path, quantization: str | None = None,
             device: str = 'cpu', dtype: str | None = None) -> HFMLLM:
        """Load from a directory written by :meth:`save`, a hub id, or a directory holding a
        real configuration without weights (``cdcca.json`` with ``"init": "random"``, see
        :mod:`cdcca_ros.models.real`), whose weights are then initialised locally.

        The trainable set is the saved one (``cdcca.json`` ``trainable`` with its values in
        ``trainable.safetensors``), else the one ``cdcca.json`` declares (``trainable_set``:
        a :class:`TrainableConfig` dict, fresh values), else none (the caller configures it).

        Args:
            path_or_hub_id: Directory or hub id.
            quantization: None, ``'4bit'`` or ``'8bit'`` (bitsandbytes).
            device: Torch device string; ``'meta'`` builds shapes only (accelerate's
                ``init_empty_weights``: no memory, no values), for a random-init directory.
            dtype: Weights dtype (``'float32'``, ``'bfloat16'``, ``'float16'``); None: the
                checkpoint's own for saved weights, float32 for a random init.

        Raises:
            ConfigError: An unknown quantization or dtype, or a combination that cannot be.
            ModelLoadError: Nothing loadable at ``path_or_hub_id``.
        """
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        if quantization not in QUANTIZATIONS:
            raise ConfigError(
                f'quantization must be one of {QUANTIZATIONS}, got {quantization!r}')
        torch_dtype = _torch_dtype(dtype)
        source = str(path_or_hub_id)
        local = Path(source).is_dir()
        meta: dict[str, Any] = {}
        if local and (Path(source) / CDCCA_JSON).is_file():
            meta = json.loads((Path(source) / CDCCA_JSON).read_text())
            if meta.get('family') != cls.family:
                raise ModelLoadError(
                    f'{source} holds family {meta.get("family")!r}, not {cls.family!r}')
        random_init = meta.get('init') == 'random'
        if device == 'meta' and not random_init:
            raise ConfigError(f'{source}: device "meta" builds shapes from a random-init '
                              'configuration only (saved weights have values)')
        if random_init and quantization is not None:
            raise ConfigError(
                f'{source} has no weights to quantize at load: save a random-init model '
                '(real.materialize) and load that directory quantized')
        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs['dtype'] = torch_dtype
        if quantization is not None:
            kwargs['quantization_config'] = cls._bnb_config(quantization)
            kwargs['device_map'] = device
        if quantization == '8bit':
            # bitsandbytes warns on every 8-bit matmul with float32 inputs; it is expected.
            warnings.filterwarnings('ignore', message='MatMul8bitLt: inputs will be cast')
        hf_class = getattr(transformers, cls.hf_class_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = cls._prepare_image_processor(
                cls._image_processor_class().from_pretrained(source))
            if random_init:
                model = cls._random_model(hf_class, source, tokenizer, int(meta.get('seed', 0)),
                                          torch_dtype or torch.float32, device)
            else:
                model = hf_class.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f'cannot load {cls.family} from {source!r}: {err}') from err
        if quantization is None and device != 'meta':
            model.to(device)
        obj = cls(model, tokenizer, image_processor,
                  prompt_template=meta.get('prompt_template', DEFAULT_PROMPT))
        saved_space = meta.get('vision_space')
        if saved_space is not None:
            saved_space['grid'] = tuple(saved_space['grid'])
            saved = VisionSpace(**saved_space)
            if torch_dtype is not None:
                # Weights cast to another dtype change the encoder's fingerprint (and its
                # tokens, slightly); the shapes must still be the saved ones.
                saved = dataclasses.replace(saved, encoder=obj.vision_space().encoder)
            if saved != obj.vision_space():
                raise ModelLoadError(
                    f'{source}: vision space {obj.vision_space()} differs from the saved '
                    f'{saved_space}')
        if meta.get('trainable') is not None:
            obj.configure_trainable(TrainableConfig.from_dict(meta['trainable']))
            trainable_path = Path(source) / TRAINABLE_FILE
            if not trainable_path.is_file():
                raise ModelLoadError(f'{source}: {TRAINABLE_FILE} is missing')
            obj.load_trainable_state_dict(load_file(str(trainable_path), device=str(obj.device)))
        elif meta.get('trainable_set') is not None:
            # A declared trainable set without saved values (a real configuration: the
            # paper's set), fresh as any new one (LoRA B zero).
            try:
                cfg = TrainableConfig.from_dict(meta['trainable_set'])
            except (TypeError, ConfigError) as err:
                raise ModelLoadError(f'{source}: invalid trainable_set in {CDCCA_JSON}: '
                                     f'{err}') from err
            obj.configure_trainable(cfg)
        return obj

    @classmethod
    def _random_model(cls, hf_class: Any, source: str, tokenizer: Any, seed: int,
                      dtype: torch.dtype, device: str) -> nn.Module:
        """A model of the directory's ``config.json`` with locally initialised weights.

        Token ids the model reads from its config (image placeholders, pad/bos/eos) are
        those of the directory's tokenizer (the real tokenizers need the hub); sizes,
        vocabulary included, stay the real ones. ``device='meta'`` builds under accelerate's
        ``init_empty_weights``: shapes only.
        """
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        cls._random_init_config(config, tokenizer)

        if device == 'meta':
            from accelerate import init_empty_weights

            with init_empty_weights():
                model = hf_class._from_config(config, dtype=dtype)
        else:
            model = seeded(seed, lambda: hf_class._from_config(config, dtype=dtype))
        # from_pretrained ties the output embeddings to the input ones; _from_config leaves
        # that to the caller (OPT and Qwen2-VL-2B tie them). Outside init_empty_weights,
        # whose parameter hook would give the tied slot a fresh meta tensor.
        model.tie_weights()
        if device != 'meta':
            seeded(seed + 1, lambda: cls._random_init_weights(model))
        return model

    @classmethod
    def _random_init_config(cls, config: Any, tokenizer: Any) -> None:
        """Point ``config``'s special token ids at ``tokenizer``'s (families add theirs)."""
        text = config.get_text_config()
        for name in ('pad_token_id', 'bos_token_id', 'eos_token_id'):
            value = getattr(tokenizer, name)
            for cfg in {id(config): config, id(text): text}.values():
                if hasattr(cfg, name) or cfg is text:
                    setattr(cfg, name, value)

    @classmethod
    def _random_init_weights(cls, model: nn.Module) -> None:
        """Adjust a freshly initialised random model (family hook; nothing by default)."""

    @classmethod
    def _bnb_config(cls, quantization: str) -> Any:
        """bitsandbytes config that quantizes only the language model.

        ``quant_skip_modules`` are full module-path prefixes (transformers matches them
        from the start of a module name). The shared vision encoder stays exact (teacher
        and student must produce the same tokens) and so do the small bridge modules and
        the LM head.
        """
        from transformers import BitsAndBytesConfig

        skip = list(cls.quant_skip_modules)
        if quantization == '8bit':
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                  bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=skip)


def _prompt_cost(question: str, ids: list[int]) -> int:
    """Bytes a prompt-cache entry holds (estimate)."""
    return sys.getsizeof(question) + sys.getsizeof(ids) + 32 * len(ids)


def keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator | None,
              device: torch.device) -> Tensor:
    """Bernoulli keep-mask (True with probability ``1 - p``) drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return (torch.rand(shape, generator=generator, device=where) >= p).to(device)


def check_mc_args(p: float, num_masks: int) -> None:
    """Validate the Monte-Carlo dropout arguments."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f'dropout rate p must be in [0, 1), got {p}')
    if num_masks < 1:
        raise ConfigError(f'num_masks must be >= 1, got {num_masks}')


def seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` under a fixed torch seed without disturbing the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


DTYPES = ('float32', 'bfloat16', 'float16')


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    """``'bfloat16'`` -> ``torch.bfloat16``; None stays None.

    Raises:
        ConfigError: Not one of :data:`DTYPES`.
    """
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ConfigError(f'dtype must be one of {DTYPES} or None, got {dtype!r}')
    return getattr(torch, dtype)


class WeightsStamp:
    """A cheap check that nothing a cached computation read from a model has changed.

    Taken over named paths of a module (``'qformer.encoder.layer.0'``, ``'query_tokens'``),
    it records every slot on and under those paths (submodules, parameters, buffers: which
    object sits under which name), each tensor's storage, dtype and in-place version, and
    peft's adapter switches. :meth:`matches` then needs only dict lookups and attribute reads
    (tens of microseconds), no module walk. Caught: ``copy_``/``load_state_dict`` (hot-apply,
    rollback), optimizer steps and peft merges (version bump), ``to()`` (storage), replaced
    modules or parameters (peft injection, ``load_state_dict(assign=True)``), adapter
    enable/disable/switch. Not caught: writes through ``.data``, which bypass the version
    counter.
    """

    def __init__(self, root: nn.Module, paths: Sequence[str]) -> None:
        """Stamp ``paths`` (dotted attribute paths under ``root``) as they are now.

        Raises:
            ModelError: A path does not exist under ``root``.
        """
        self._slots: list[tuple[dict[str, Any], str, Any]] = []
        self._tensors: list[Tensor] = []
        self._adapters: list[nn.Module] = []
        for path in paths:
            node: Any = root
            for name in path.split('.'):
                store = next((s for s in (node._modules, node._parameters, node._buffers)
                              if name in s), None) if isinstance(node, nn.Module) else None
                if store is None:
                    raise ModelError(f'{type(root).__name__} has no {path!r} (at {name!r})')
                node = store[name]
                self._slots.append((store, name, node))
            if isinstance(node, nn.Module):
                self._walk(node)
            elif node is not None:
                self._tensors.append(node)
        self._stores = [slot[0] for slot in self._slots]
        self._names = [slot[1] for slot in self._slots]
        self._objects = [slot[2] for slot in self._slots]
        self._state = self._read()

    def _walk(self, module: nn.Module) -> bool:
        """Record ``module``'s tensors, adapter switches and the slots that lead to them.

        Subtrees without a tensor (dropout, identity, empty adapter dicts) are skipped: they
        hold no weights, and fewer slots keep :meth:`matches` cheap. Returns whether
        ``module`` holds a tensor.
        """
        if '_active_adapter' in module.__dict__:
            self._adapters.append(module)
        found = False
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    self._slots.append((store, name, tensor))
                    self._tensors.append(tensor)
                    found = True
        for name, child in module._modules.items():
            if child is not None and self._walk(child):
                self._slots.append((module._modules, name, child))
                found = True
        return found

    def _read(self) -> tuple[Any, ...]:
        # map() over C-level getters: no Python loop per tensor.
        tensors = self._tensors
        return (list(map(_VERSION, tensors)), list(map(Tensor.data_ptr, tensors)),
                list(map(_DTYPE, tensors)),
                [(m.__dict__.get('_disable_adapters'), repr(m.__dict__['_active_adapter']),
                  tuple(m.__dict__.get('merged_adapters', ()))) for m in self._adapters])

    def matches(self) -> bool:
        """Whether every stamped slot still holds the same, unmodified object."""
        held = map(dict.get, self._stores, self._names)
        if not all(map(operator.is_, held, self._objects)):
            return False
        return self._read() == self._state


_VERSION = operator.attrgetter('_version')
_DTYPE = operator.attrgetter('dtype')
