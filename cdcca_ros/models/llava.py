"""LLaVA (CLIP vision + projector + Llama) behind the :class:`~.base.MLLM` interface.

Vision tokens are the selected CLIP features *before* the projector (layer
``vision_feature_layer``; CLS dropped under the ``'default'`` strategy). Answering from a
kept subset projects only the kept tokens and feeds them as the image embeddings, so the
prompt holds ``K`` image positions instead of ``N``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cdcca_ros.errors import ConfigError
from cdcca_ros.models._hf import (
    DEFAULT_PROMPT,
    HFMLLM,
    check_mc_args,
    eval_mode,
    keep_mask,
    seeded,
)
from cdcca_ros.models.tokenizer import IMAGE, build_word_tokenizer

LLAMA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


class LlavaMLLM(HFMLLM):
    """A ``LlavaForConditionalGeneration`` (single image, fixed resolution)."""

    family: ClassVar[str] = 'llava'
    hf_class_name: ClassVar[str] = 'LlavaForConditionalGeneration'
    default_lora_targets: ClassVar[tuple[str, ...]] = LLAMA_TARGETS
    lm_prefix: ClassVar[str] = 'model.language_model'
    shared_vision_prefixes: ClassVar[tuple[str, ...]] = ('model.vision_tower.',)
    quant_skip_modules: ClassVar[tuple[str, ...]] = (
        'model.vision_tower', 'model.multi_modal_projector', 'lm_head')

    @classmethod
    def _image_processor_class(cls) -> Any:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil

    @property
    def decoder(self) -> nn.Module:
        return self.torch_model.model.language_model

    @classmethod
    def _random_init_config(cls, config: Any, tokenizer: Any) -> None:
        super()._random_init_config(config, tokenizer)
        config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE)

    def _layers(self) -> list[int]:
        layer = self.torch_model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def _vision_modules(self) -> list[nn.Module]:
        return [self.torch_model.model.vision_tower]

    def _vision_space_raw(self) -> tuple[int, int, tuple[int, int], bool, str]:
        config = self.torch_model.config
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        has_cls = config.vision_feature_select_strategy != 'default'
        layers = ','.join(str(x) for x in self._layers())
        name = (f'llava-{vc.model_type}/{vc.image_size}px/p{vc.patch_size}/d{vc.hidden_size}'
                f'/L{vc.num_hidden_layers}/layer{layers}')
        dim = vc.hidden_size * len(self._layers())
        return dim, side * side + int(has_cls), (side, side), has_cls, name

    def _pixel_batch(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        out = self.image_processor(images=list(images), return_tensors='pt',
                                   input_data_format='channels_last')
        return {'pixel_values': out['pixel_values'].to(self.device, self._vision_dtype())}

    def _encode(self, pixels: dict[str, Tensor]) -> Tensor:
        out = self.torch_model.model.vision_tower(pixels['pixel_values'],
                                                  output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in self._layers()], dim=-1)
        if self.torch_model.config.vision_feature_select_strategy == 'default':
            feats = feats[:, 1:]
        return feats

    def _image_embeds(self, tokens: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor]:
        projected = self.torch_model.model.multi_modal_projector(tokens)
        return projected, projected

    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int,
                          generator: torch.Generator | None = None) -> Tensor:
        """Dropout masks on the tokens pushed through the projector (linear-GELU-linear).

        Returns:
            ``[M, B, N, H]`` with ``H`` the LM hidden size.
        """
        check_mc_args(p, num_masks)
        tokens = self._check_tokens(tokens, None, tokens.shape[0])
        keep = keep_mask((num_masks, *tokens.shape), p, generator, tokens.device)
        with eval_mode(self.torch_model):
            x = self._adapt(tokens.unsqueeze(0) * keep / (1.0 - p))
            return self.torch_model.model.multi_modal_projector(x)

    @classmethod
    def build_tiny(cls, vocabulary: Sequence[str], *, image_size: int = 64,
                   patch_size: int = 8, vision_hidden: int = 48, vision_layers: int = 2,
                   vision_heads: int = 4, lm_hidden: int = 64, lm_layers: int = 2,
                   lm_heads: int = 4, lm_kv_heads: int | None = None,
                   lm_ffn: int | None = None, prompt_template: str = DEFAULT_PROMPT,
                   seed: int = 0, vision_from: LlavaMLLM | None = None) -> LlavaMLLM:
        """Build a small LLaVA from configs, fully offline.

        With ``vision_from`` the CLIP config and weights are copied from that model.
        """
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        if vision_from is not None:
            if not isinstance(vision_from, LlavaMLLM):
                raise ConfigError(
                    f'vision_from must be a LlavaMLLM, got {type(vision_from).__name__}')
            vision_config = CLIPVisionConfig.from_dict(
                vision_from.torch_model.config.vision_config.to_dict())
        else:
            if image_size % patch_size or vision_hidden % vision_heads:
                raise ConfigError(
                    f'image_size={image_size} must be a multiple of patch_size={patch_size} '
                    f'and vision_hidden={vision_hidden} of vision_heads={vision_heads}')
            vision_config = CLIPVisionConfig(
                hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
        if lm_hidden % lm_heads:
            raise ConfigError(f'lm_hidden={lm_hidden} must be a multiple of lm_heads={lm_heads}')
        tokenizer = build_word_tokenizer(vocabulary, [prompt_template.format(question='')])
        text_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=lm_hidden, intermediate_size=lm_ffn or
            4 * lm_hidden, num_hidden_layers=lm_layers, num_attention_heads=lm_heads,
            num_key_value_heads=lm_kv_heads or lm_heads, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)
        side = vision_config.image_size // vision_config.patch_size
        config = LlavaConfig(
            vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_length=side * side, vision_feature_select_strategy='default',
            vision_feature_layer=-1)
        model = seeded(seed, lambda: LlavaForConditionalGeneration(config))
        if vision_from is not None:
            model.model.vision_tower.load_state_dict(
                vision_from.torch_model.model.vision_tower.state_dict())
        size = vision_config.image_size
        # Whole frame squashed to a square (no centre crop: objects near the border count).
        image_processor = cls._image_processor_class()(
            size={'height': size, 'width': size}, do_center_crop=False)
        return cls(model, tokenizer, image_processor, prompt_template=prompt_template)
