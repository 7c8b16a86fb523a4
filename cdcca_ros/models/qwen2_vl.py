"""Qwen2-VL behind the :class:`~cdcca_ros.models.base.MLLM` interface.

``Qwen2VLProcessor`` cannot be built without torchvision (its video processor), so this
module does the processor's work itself: ``Qwen2VLImageProcessorPil`` for pixels, and
``<|vision_start|> <|image_pad|> * (grid / merge^2) <|vision_end|>`` in the prompt with
mrope positions from ``get_rope_index`` (``mm_token_type_ids`` marks the image pads).

Images are resized to one fixed square size, so every image has the same patch grid.
Vision tokens are the vision tower's patch features *before* the patch merger, returned in
raster (row-major) order, not in the merger's 2x2-group order.

Answering from a kept subset: the merger needs every 2x2 group, so dropped tokens are
filled with zeros at their positions before the merger. The LM therefore always sees the
full ``grid / 4`` image positions with their exact mrope positions; only the content of the
dropped patches is missing.
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
from cdcca_ros.models.llava import LLAMA_TARGETS
from cdcca_ros.models.tokenizer import IMAGE_PAD, VISION_END, VISION_START, build_word_tokenizer

HUB_IMAGE_SIDE = 448  # fixed square size for hub checkpoints (32x32 patches, 256 LM tokens)


class Qwen2VLMLLM(HFMLLM):
    """A ``Qwen2VLForConditionalGeneration`` on single images of one fixed size."""

    family: ClassVar[str] = 'qwen2_vl'
    hf_class_name: ClassVar[str] = 'Qwen2VLForConditionalGeneration'
    default_lora_targets: ClassVar[tuple[str, ...]] = LLAMA_TARGETS
    lm_prefix: ClassVar[str] = 'model.language_model'
    shared_vision_prefixes: ClassVar[tuple[str, ...]] = ('model.visual.',)
    vision_not_shared_prefixes: ClassVar[tuple[str, ...]] = ('model.visual.merger.',)
    quant_skip_modules: ClassVar[tuple[str, ...]] = ('model.visual', 'lm_head')

    def __init__(self, torch_model: nn.Module, tokenizer: Any, image_processor: Any,
                 prompt_template: str = DEFAULT_PROMPT) -> None:
        super().__init__(torch_model, tokenizer, image_processor, prompt_template)
        vc = torch_model.config.vision_config
        size = image_processor.size
        # min == max pixels pins the resize to one square size (set by build_tiny / save).
        side = int(round(size['longest_edge'] ** 0.5))
        factor = vc.patch_size * vc.spatial_merge_size
        if side * side != size['longest_edge'] or side % factor:
            raise ConfigError(
                f'qwen2_vl: image processor longest_edge={size["longest_edge"]} must be the '
                f'square of a multiple of patch_size*merge_size={factor}')
        self.image_side = side
        self.grid = (side // vc.patch_size, side // vc.patch_size)
        self.merge = vc.spatial_merge_size
        self.vision_start_id = tokenizer.convert_tokens_to_ids(VISION_START)
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
        rows, cols, m = self.grid[0], self.grid[1], self.merge
        # Merger order index i = ((bh * cols/m + bw) * m + mh) * m + mw; raster r = row*cols+col.
        bh, bw, mh, mw = np.meshgrid(np.arange(rows // m), np.arange(cols // m), np.arange(m),
                                     np.arange(m), indexing='ij')
        raster_of_merger = ((bh * m + mh) * cols + (bw * m + mw)).reshape(-1)
        self._merger_to_raster = torch.as_tensor(np.argsort(raster_of_merger))
        self._raster_to_merger = torch.as_tensor(raster_of_merger)
        r, c = np.divmod(np.arange(rows * cols), cols)
        self._group_pos = torch.as_tensor((r % m) * m + (c % m))  # slot of a raster token

    @classmethod
    def _image_processor_class(cls) -> Any:
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil

    @classmethod
    def _prepare_image_processor(cls, image_processor: Any) -> Any:
        """Pin a hub processor's dynamic resolution to one square size (fixed token count)."""
        size = dict(image_processor.size)
        if size.get('shortest_edge') != size.get('longest_edge'):
            pixels = HUB_IMAGE_SIDE * HUB_IMAGE_SIDE
            image_processor.size = {'shortest_edge': pixels, 'longest_edge': pixels}
        return image_processor

    @property
    def decoder(self) -> nn.Module:
        return self.torch_model.model.language_model

    @classmethod
    def _random_init_config(cls, config: Any, tokenizer: Any) -> None:
        super()._random_init_config(config, tokenizer)
        ids = tokenizer.convert_tokens_to_ids
        config.image_token_id = ids(IMAGE_PAD)
        config.video_token_id = tokenizer.unk_token_id
        config.vision_start_token_id = ids(VISION_START)
        config.vision_end_token_id = ids(VISION_END)

    def _vision_modules(self) -> list[nn.Module]:
        visual = self.torch_model.model.visual
        return [visual.patch_embed, visual.blocks]

    def _vision_space_raw(self) -> tuple[int, int, tuple[int, int], bool, str]:
        vc = self.torch_model.config.vision_config
        name = (f'qwen2_vl-vit/{self.image_side}px/p{vc.patch_size}/d{vc.embed_dim}'
                f'/L{vc.depth}')
        return vc.embed_dim, self.grid[0] * self.grid[1], self.grid, False, name

    def _grid_thw(self, batch: int) -> Tensor:
        return torch.tensor([[1, *self.grid]] * batch, device=self.device)

    def _pixel_batch(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        from PIL import Image

        side = self.image_side
        squares = [np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
                   for img in images]
        out = self.image_processor(images=squares, return_tensors='pt',
                                   input_data_format='channels_last')
        return {'pixel_values': out['pixel_values'].to(self.device, self._vision_dtype())}

    def _encode(self, pixels: dict[str, Tensor]) -> Tensor:
        batch = pixels['pixel_values'].shape[0] // (self.grid[0] * self.grid[1])
        out = self.torch_model.model.visual(pixels['pixel_values'], grid_thw=self._grid_thw(batch))
        tokens = out.last_hidden_state.reshape(batch, self.grid[0] * self.grid[1], -1)
        return tokens[:, self._merger_to_raster.to(tokens.device)]

    def _image_placeholder_ids(self, num: int) -> list[int]:
        return [self.vision_start_id] + [self.image_token_id] * num + [self.vision_end_id]

    def _position_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mm_types = (input_ids == self.image_token_id).int()
        positions, _ = self.torch_model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=self._grid_thw(
                input_ids.shape[0]), attention_mask=attention_mask)
        return positions

    def _image_embeds(self, tokens: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor]:
        if indices is None:
            full = tokens
        else:
            # Dropped patches become zeros at their own positions (see module docstring).
            full = tokens.new_zeros((tokens.shape[0], self.grid[0] * self.grid[1],
                                     tokens.shape[2]))
            full = full.scatter(1, indices.to(tokens.device).unsqueeze(-1).expand_as(tokens),
                                tokens)
        ordered = full[:, self._raster_to_merger.to(full.device)]
        merged = self.torch_model.model.visual.merger(ordered.reshape(-1, ordered.shape[-1]))
        merged = merged.view(tokens.shape[0], -1, merged.shape[-1])
        return merged, merged

    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int,
                          generator: torch.Generator | None = None) -> Tensor:
        """Dropout masks pushed through the merger's LayerNorm and first linear layer.

        The merger concatenates the 4 LayerNorm-ed tokens of a 2x2 group before its first
        linear layer, so that layer is a sum of per-token terms ``W_slot(token) @ ln(x)``;
        this returns each token's term (bias left out). LayerNorm makes it a non-linear
        function of the token, so its variance is not ``x^2 p / (1 - p)``.

        Returns:
            ``[M, B, N, 4 * D]`` in raster token order.
        """
        check_mc_args(p, num_masks)
        tokens = self._check_tokens(tokens, None, tokens.shape[0])
        merger = self.torch_model.model.visual.merger
        keep = keep_mask((num_masks, *tokens.shape), p, generator, tokens.device)
        with eval_mode(self.torch_model):
            masked = self._adapt(tokens.unsqueeze(0) * keep / (1.0 - p))
            normed = merger.ln_q(masked)                                        # [M, B, N, D]
            weight = merger.mlp[0].weight                                       # [O, G*D]
            slots = weight.view(weight.shape[0], self.merge ** 2, -1)           # [O, G, D]
            out = normed.new_zeros((*normed.shape[:3], weight.shape[0]))
            group_pos = self._group_pos.to(tokens.device)
            for slot in range(self.merge ** 2):
                sel = group_pos == slot
                out[:, :, sel] = normed[:, :, sel] @ slots[:, slot].T
        return out

    @classmethod
    def build_tiny(cls, vocabulary: Sequence[str], *, image_size: int = 64,
                   patch_size: int = 8, vision_hidden: int = 48, vision_layers: int = 2,
                   vision_heads: int = 4, lm_hidden: int = 64, lm_layers: int = 2,
                   lm_heads: int = 4, lm_kv_heads: int | None = None,
                   lm_ffn: int | None = None, prompt_template: str = DEFAULT_PROMPT,
                   seed: int = 0, vision_from: Qwen2VLMLLM | None = None) -> Qwen2VLMLLM:
        """Build a small Qwen2-VL from configs, fully offline.

        The merger maps ``vision_hidden`` to ``lm_hidden``; the text rope's mrope sections
        split ``head_dim / 2`` as (t, h, w) ~ (1/4, 3/8, 3/8) like the real model.
        With ``vision_from`` the vision tower (not the merger) is copied from that model.
        """
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        merge = 2
        if vision_from is not None:
            if not isinstance(vision_from, Qwen2VLMLLM):
                raise ConfigError(
                    f'vision_from must be a Qwen2VLMLLM, got {type(vision_from).__name__}')
            tvc = vision_from.torch_model.config.vision_config
            image_size, patch_size = vision_from.image_side, tvc.patch_size
            vision_hidden, vision_layers, vision_heads = tvc.embed_dim, tvc.depth, tvc.num_heads
        if image_size % (patch_size * merge):
            raise ConfigError(
                f'image_size={image_size} must be a multiple of patch_size*merge={patch_size}*2')
        if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
            raise ConfigError(
                f'vision_hidden={vision_hidden} / vision_heads={vision_heads} must be a '
                'multiple of 4 (2-D axial rope)')
        if lm_hidden % lm_heads or (lm_hidden // lm_heads) % 2:
            raise ConfigError(
                f'lm_hidden={lm_hidden} / lm_heads={lm_heads} must be an even integer')
        half = lm_hidden // lm_heads // 2
        temporal = max(1, half // 4)
        height = (half - temporal) // 2
        mrope = [temporal, height, half - temporal - height]
        tokenizer = build_word_tokenizer(vocabulary, [prompt_template.format(question='')])
        config = Qwen2VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=lm_hidden,
                intermediate_size=lm_ffn or 4 * lm_hidden, num_hidden_layers=lm_layers,
                num_attention_heads=lm_heads, num_key_value_heads=lm_kv_heads or lm_heads,
                max_position_embeddings=512, rope_parameters={
                    'rope_type': 'default', 'rope_theta': 10000.0, 'mrope_section': mrope},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(
                depth=vision_layers, embed_dim=vision_hidden, hidden_size=lm_hidden,
                num_heads=vision_heads, mlp_ratio=4, patch_size=patch_size,
                spatial_merge_size=merge, temporal_patch_size=2, in_channels=3),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
            video_token_id=tokenizer.unk_token_id,
            vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
            vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END))
        model = seeded(seed, lambda: Qwen2VLForConditionalGeneration(config))
        if vision_from is not None:
            for name in ('patch_embed', 'blocks'):
                getattr(model.model.visual, name).load_state_dict(
                    getattr(vision_from.torch_model.model.visual, name).state_dict())
        image_processor = cls._image_processor_class()(
            patch_size=patch_size, merge_size=merge, temporal_patch_size=2,
            min_pixels=image_size * image_size, max_pixels=image_size * image_size)
        return cls(model, tokenizer, image_processor, prompt_template=prompt_template)
