"""BLIP-2 (ViT + Q-Former + OPT) behind the :class:`~cdcca_ros.models.base.MLLM` interface.

Vision tokens are the ViT's last hidden state, CLS included (``N = grid^2 + 1``). They
already carry their position embeddings, so answering from a kept subset simply lets the
Q-Former cross-attend to the kept tokens only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cdcca_ros.errors import ConfigError, ModelLoadError
from cdcca_ros.models._hf import (
    DEFAULT_PROMPT,
    HFMLLM,
    WeightsStamp,
    check_mc_args,
    eval_mode,
    keep_mask,
    seeded,
)
from cdcca_ros.models.tokenizer import IMAGE, build_word_tokenizer


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value <= 0 or by <= 0 or value % by:
        raise ConfigError(f'{name}={value} must be a positive multiple of {by_name}={by}')


class Blip2MLLM(HFMLLM):
    """A ``Blip2ForConditionalGeneration`` with a decoder-only (OPT) language model."""

    family: ClassVar[str] = 'blip2'
    hf_class_name: ClassVar[str] = 'Blip2ForConditionalGeneration'
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2')
    lm_prefix: ClassVar[str] = 'language_model'
    shared_vision_prefixes: ClassVar[tuple[str, ...]] = ('vision_model.',)
    quant_skip_modules: ClassVar[tuple[str, ...]] = (
        'vision_model', 'qformer', 'language_projection', 'language_model.lm_head')

    def __init__(self, torch_model: nn.Module, tokenizer: Any, image_processor: Any,
                 prompt_template: str = DEFAULT_PROMPT) -> None:
        if not torch_model.config.use_decoder_only_language_model:
            raise ModelLoadError('blip2: only decoder-only language models (OPT) are supported')
        super().__init__(torch_model, tokenizer, image_processor, prompt_template)
        # (stamp of the weights read, projection) of mc_token_features; see _mc_projection.
        self._mc_cache: tuple[WeightsStamp, tuple[Tensor, Tensor, int, int, int]] | None = None

    # ---------------------------------------------------------------- hooks
    @classmethod
    def _image_processor_class(cls) -> Any:
        from transformers import BlipImageProcessorPil

        return BlipImageProcessorPil

    @property
    def decoder(self) -> nn.Module:
        return self.torch_model.language_model.model.decoder

    @classmethod
    def _random_init_config(cls, config: Any, tokenizer: Any) -> None:
        super()._random_init_config(config, tokenizer)
        config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE)
        # The released ViT config says 1e-10 (its weights always come from a checkpoint):
        # random weights that small make every token LayerNorm's epsilon (~1e-6, all alike).
        config.vision_config.initializer_range = max(config.vision_config.initializer_range,
                                                     config.initializer_range)

    @classmethod
    def _random_init_weights(cls, model: nn.Module) -> None:
        # HF starts the queries at zero (all identical); give each its own direction.
        with torch.no_grad():
            model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)

    def _sequence(self, image_ids: list[int], prompt_ids: list[int]) -> list[int]:
        # BLIP-2's layout: image embeddings first, then <s> and the prompt.
        head = [self.bos_token_id] if self.bos_token_id is not None else []
        return image_ids + head + prompt_ids

    def _vision_modules(self) -> list[nn.Module]:
        return [self.torch_model.vision_model]

    def _vision_space_raw(self) -> tuple[int, int, tuple[int, int], bool, str]:
        vc = self.torch_model.config.vision_config
        side = vc.image_size // vc.patch_size
        name = (f'blip2-vit/{vc.image_size}px/p{vc.patch_size}/d{vc.hidden_size}'
                f'/L{vc.num_hidden_layers}')
        return vc.hidden_size, side * side + 1, (side, side), True, name

    def _pixel_batch(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        out = self.image_processor(images=list(images), return_tensors='pt',
                                   input_data_format='channels_last')
        return {'pixel_values': out['pixel_values'].to(self.device, self._vision_dtype())}

    def _encode(self, pixels: dict[str, Tensor]) -> Tensor:
        return self.torch_model.vision_model(pixel_values=pixels['pixel_values']).last_hidden_state

    def _image_embeds(self, tokens: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor]:
        model = self.torch_model
        query = model.query_tokens.expand(tokens.shape[0], -1, -1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        out = model.qformer(query_embeds=query, encoder_hidden_states=tokens,
                            encoder_attention_mask=mask).last_hidden_state
        return model.language_projection(out), out

    # ---------------------------------------------------------------- Eq. 3 features
    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int,
                          generator: torch.Generator | None = None) -> Tensor:
        """Per-token contribution to the Q-Former's first cross-attention under dropout.

        For mask ``m`` and token ``n``: ``F[m, b, n] = sum_q attn[q, n] * V[n]`` over the
        queries ``q`` (heads concatenated), where ``attn`` is the softmax over all (masked)
        tokens. The softmax couples the tokens, and the key/value projections mix feature
        dimensions, so the variance is a property of this model, not ``x^2 p / (1 - p)``.

        What does not depend on the tokens is cached (see :meth:`_mc_projection`), so the
        ``M * B`` masked copies go through one matrix product and one softmax.

        Returns:
            ``[M, B, N, C]`` with ``C`` the Q-Former hidden size.
        """
        check_mc_args(p, num_masks)
        weight, bias, heads, queries, num_tokens = self._mc_projection()
        if tokens.ndim != 3 or tokens.shape[1] != num_tokens or tokens.shape[2] != weight.shape[0]:
            self._check_tokens(tokens, None, tokens.shape[0])  # raises, naming what is wrong
        batch, num, dim = tokens.shape
        with torch.no_grad():
            keep = keep_mask((num_masks, batch, num, dim), p, generator, weight.device)
            # As the Q-Former sees them: in the vision dtype, then its own (it stays fp32 in
            # half-precision models).
            x = tokens.to(weight.device, self._vision_dtype()).to(weight.dtype)
            x = (x.unsqueeze(0) * keep).reshape(-1, dim)                         # [MBN, D]
            if self.token_adapter is not None:
                # The bridge reads adapted tokens: dropout on the token, then the adapter.
                x = self._adapt(x / (1.0 - p)) * (1.0 - p)
            # bias + (x @ weight) / (1 - p): dropout's scale on the inputs, not the bias.
            y = torch.addmm(bias, x, weight, alpha=1.0 / (1.0 - p))
            split = heads * queries
            scores = y[:, :split].reshape(-1, num, heads, queries)              # [MB, N, h, Q]
            probs = scores.softmax(dim=1).sum(dim=3)                             # [MB, N, h]
            values = y[:, split:].reshape(-1, num, heads, (y.shape[1] - split) // heads)
            contrib = probs.unsqueeze(-1) * values                               # [MB, N, h, d]
        return contrib.reshape(num_masks, batch, num, -1)

    # What the cached projection reads: query tokens, the layernorm on them, the first
    # Q-Former layer's self-attention block (makes the queries) and its cross-attention's
    # query/key/value projections.
    _MC_PATHS: ClassVar[tuple[str, ...]] = (
        'query_tokens', 'qformer.layernorm', 'qformer.encoder.layer.0.attention',
        *(f'qformer.encoder.layer.0.crossattention.attention.{name}'
          for name in ('query', 'key', 'value')))

    def clear_mc_cache(self) -> None:
        """Drop the cached projection of :meth:`mc_token_features` (rebuilt on next use).

        Only needed after writes the cache cannot see (through ``.data``); see
        :class:`~cdcca_ros.models._hf.WeightsStamp`.
        """
        self._mc_cache = None

    def _mc_projection(self) -> tuple[Tensor, Tensor, int, int, int]:
        """The token-independent part of the first cross-attention, cached per weights.

        The queries (query tokens -> layernorm -> self-attention block) are fixed, so the
        attention scores of the tokens ``x`` are ``x @ G`` with ``G = W_k^T q * scaling`` per
        head and query; the key bias adds the same score to every token of a (head, query)
        row, which the softmax over tokens cancels. The value projection is read off the
        (LoRA-wrapped) module itself by feeding it the identity, so it is exactly what the
        module computes, adapters included.

        Returns:
            ``(weight [D, h*Q + C], bias [h*Q + C], heads h, queries Q, tokens N)``:
            ``x @ weight + bias`` gives the scores (first ``h*Q`` columns, laid out
            ``[h, Q]``, bias 0) and the values; ``N`` is the vision space's token count.
        """
        cached = self._mc_cache
        if cached is not None and cached[0].matches():
            return cached[1]
        model = self.torch_model
        layer = model.qformer.encoder.layer[0]
        if not layer.has_cross_attention:
            raise ModelLoadError('blip2: the first Q-Former layer has no cross-attention')
        stamp = WeightsStamp(model, self._MC_PATHS)
        cross = layer.crossattention.attention
        key_proj, value_proj = cross.key, cross.value
        heads, head_dim = cross.num_attention_heads, cross.attention_head_size
        with eval_mode(model):
            query = layer.attention(model.qformer.layernorm(model.query_tokens))[0]  # [Q, C]
            q = cross.query(query).view(-1, heads, head_dim)                     # [Q, h, d]
            dim = model.config.qformer_config.encoder_hidden_size
            eye = torch.eye(dim, dtype=q.dtype, device=q.device)
            zero = torch.zeros(1, dim, dtype=q.dtype, device=q.device)
            key_bias = key_proj(zero)
            key_weight = (key_proj(eye) - key_bias).view(dim, heads, head_dim)   # [D, h, d]
            scores = torch.einsum('khd,qhd->khq', key_weight, q) * cross.scaling
            value_bias = value_proj(zero)[0]                                      # [C]
            value_weight = value_proj(eye) - value_bias                           # [D, C]
            weight = torch.cat([scores.reshape(dim, -1), value_weight], dim=1).contiguous()
            bias = torch.cat([torch.zeros_like(weight[0, :scores[0].numel()]), value_bias])
        result = (weight, bias, heads, q.shape[0], self._vision_space_raw()[1])
        self._mc_cache = (stamp, result)
        return result

    # ---------------------------------------------------------------- factory
    @classmethod
    def build_tiny(cls, vocabulary: Sequence[str], *, image_size: int | None = None,
                   patch_size: int | None = None, vision_hidden: int | None = None,
                   vision_layers: int | None = None, vision_heads: int | None = None,
                   qformer_hidden: int = 48, qformer_layers: int = 2, qformer_heads: int = 4,
                   cross_attention_frequency: int = 1, num_query_tokens: int = 8,
                   lm_hidden: int = 64, lm_layers: int = 2, lm_heads: int = 4,
                   lm_ffn: int | None = None, dropout: float = 0.1,
                   prompt_template: str = DEFAULT_PROMPT, seed: int = 0,
                   vision_from: Blip2MLLM | None = None) -> Blip2MLLM:
        """Build a small BLIP-2 from configs, fully offline, initialised for training.

        Vision sizes default to 64 px, 8 px patches, 48 dims, 2 layers, 4 heads. With
        ``vision_from`` the ViT config and weights are copied from that model (a student
        sharing its teacher's vision encoder); vision sizes then must be left unset or equal.
        """
        from transformers import (
            Blip2Config,
            Blip2ForConditionalGeneration,
            Blip2QFormerConfig,
            Blip2VisionConfig,
            OPTConfig,
        )

        vision = {'image_size': image_size, 'patch_size': patch_size,
                  'hidden_size': vision_hidden, 'num_hidden_layers': vision_layers,
                  'num_attention_heads': vision_heads}
        if vision_from is not None:
            if not isinstance(vision_from, Blip2MLLM):
                raise ConfigError(
                    f'vision_from must be a Blip2MLLM, got {type(vision_from).__name__}')
            teacher_vc = vision_from.torch_model.config.vision_config
            for key, value in vision.items():
                if value is not None and value != getattr(teacher_vc, key):
                    raise ConfigError(
                        f'{key}={value} conflicts with vision_from ({getattr(teacher_vc, key)})')
            vision_config = Blip2VisionConfig.from_dict(teacher_vc.to_dict())
        else:
            defaults = {'image_size': 64, 'patch_size': 8, 'hidden_size': 48,
                        'num_hidden_layers': 2, 'num_attention_heads': 4}
            vision = {k: defaults[k] if v is None else v for k, v in vision.items()}
            _check_divisible('image_size', vision['image_size'], 'patch_size',
                             vision['patch_size'])
            _check_divisible('vision_hidden', vision['hidden_size'], 'vision_heads',
                             vision['num_attention_heads'])
            # The default 1e-10 starts the ViT at ~0; 0.02 trains from scratch.
            vision_config = Blip2VisionConfig(intermediate_size=4 * vision['hidden_size'],
                                              initializer_range=0.02, **vision)
        _check_divisible('qformer_hidden', qformer_hidden, 'qformer_heads', qformer_heads)
        _check_divisible('lm_hidden', lm_hidden, 'lm_heads', lm_heads)
        if num_query_tokens < 1 or qformer_layers < 1 or lm_layers < 1:
            raise ConfigError(
                f'num_query_tokens={num_query_tokens}, qformer_layers={qformer_layers} and '
                f'lm_layers={lm_layers} must all be >= 1')
        tokenizer = build_word_tokenizer(vocabulary, [prompt_template.format(question='')])
        qformer_config = Blip2QFormerConfig(
            hidden_size=qformer_hidden, num_hidden_layers=qformer_layers,
            num_attention_heads=qformer_heads, intermediate_size=4 * qformer_hidden,
            encoder_hidden_size=vision_config.hidden_size, vocab_size=len(tokenizer),
            cross_attention_frequency=cross_attention_frequency,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        text_config = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=lm_hidden, num_hidden_layers=lm_layers,
            num_attention_heads=lm_heads, ffn_dim=lm_ffn or 4 * lm_hidden,
            word_embed_proj_dim=lm_hidden, max_position_embeddings=512, dropout=dropout,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)
        config = Blip2Config(
            vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
            text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE))

        def make() -> nn.Module:
            model = Blip2ForConditionalGeneration(config)
            with torch.no_grad():
                # HF starts the queries at zero (all identical); give each its own direction.
                model.query_tokens.normal_(0.0, qformer_config.initializer_range)
            return model

        model = seeded(seed, make)
        if vision_from is not None:
            model.vision_model.load_state_dict(
                vision_from.torch_model.vision_model.state_dict())
        image_processor = cls._image_processor_class()(
            size={'height': vision_config.image_size, 'width': vision_config.image_size})
        return cls(model, tokenizer, image_processor, prompt_template=prompt_template)

