"""Published models at their real configurations, without their weights.

``cdcca_ros/assets/real/<name>/`` holds, per model, the hub's ``config.json`` and
``preprocessor_config.json`` values (transcribed; the hub is never contacted), the package's word
tokenizer (the real tokenizers need the hub: prompts are shorter than a real tokenizer's, the
vocabulary size and every shape are the real ones) and a ``cdcca.json`` with ``"init":
"random"``. Loading such a directory (spec ``real:<name>``) goes through the same
:func:`~cdcca_ros.models.registry.load_model` path as a saved model or a hub id; the weights are
initialised locally (seeded), or not at all on the meta device (``device='meta'``: accelerate's
``init_empty_weights``, shapes only, for parameter counts and trainable-set layouts).

Students and the teachers that share their vision encoder:

=================  ================  ===========================================
student            teacher           shared vision encoder
=================  ================  ===========================================
blip2-opt-2.7b     blip2-opt-6.7b    EVA ViT-g/14, 224 px (257 tokens x 1408)
llava-1.5-7b       llava-1.5-13b     CLIP ViT-L/14-336 (576 tokens x 1024)
qwen2-vl-2b        qwen2-vl-7b       Qwen2-VL ViT at 448 px (1024 tokens x 1280)
=================  ================  ===========================================

Each student's ``cdcca.json`` declares its trainable set (``trainable_set``, a
:class:`~cdcca_ros.models.base.TrainableConfig`): the kinds the paper updates -- LoRA, the
language model's norms, linear-layer biases, BLIP-2's Q-Former query tokens -- at the paper's
size. The paper updates 1.65 M parameters of its 7B student; LoRA at rank 1 on the language
model's ``q_proj`` and ``v_proj`` (the LoRA paper's smallest GPT-3 setting, as good as higher
ranks there) gives BLIP-2 OPT-2.7B 1.57 M (LoRA 0.33 M, norms 0.33 M, biases 0.86 M, Q-Former
norms and query tokens 0.05 M), LLaVA-1.5-7B 0.80 M and Qwen2-VL-2B 0.29 M. The family default
(LoRA rank 8 on every attention and MLP projection: 13.0 M for BLIP-2) is what a model without
a declared set gets (the bundled models save theirs).

Accuracy at these sizes needs the real weights and is not claimed; speed, memory and bytes are
those of the real shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cdcca_ros.errors import ConfigError
from cdcca_ros.models.bundled import REAL_DIR, REAL_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

#: The student of each family.
STUDENTS = {'blip2': 'blip2-opt-2.7b', 'llava': 'llava-1.5-7b', 'qwen2_vl': 'qwen2-vl-2b'}
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


@dataclass(frozen=True)
class RealModel:
    """One shipped real configuration (from its ``cdcca.json``).

    Attributes:
        name: Directory name under ``assets/real`` (the spec is ``real:<name>``).
        family: Registry family.
        source: The hub id the configuration was transcribed from.
        published_params: Parameter count the hub publishes for it.
        role: ``'student'`` or ``'teacher'``.
        teacher: For a student, the real configuration of its teacher (same vision encoder).
    """

    name: str
    family: str
    source: str
    published_params: int
    role: str
    teacher: str | None

    @property
    def spec(self) -> str:
        """The model spec nodes and benches take (``real:<name>``)."""
        return REAL_PREFIX + self.name

    def weight_bytes(self, dtype: str = 'bfloat16') -> int:
        """Bytes of the published parameter count in ``dtype`` (a memory floor)."""
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f'dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}')
        return self.published_params * DTYPE_BYTES[dtype]


def real_models() -> dict[str, RealModel]:
    """Every shipped real configuration, by name."""
    out = {}
    for path in sorted(REAL_DIR.iterdir()):
        meta_path = path / 'cdcca.json'
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        out[path.name] = RealModel(name=path.name, family=meta['family'], source=meta['source'],
                                   published_params=int(meta['published_params']),
                                   role=meta['role'], teacher=meta.get('teacher'))
    return out


def real_model(name: str) -> RealModel:
    """The real configuration ``name`` (a directory name, or a family for its student).

    Raises:
        ConfigError: No such configuration.
    """
    models = real_models()
    name = STUDENTS.get(name, name)
    if name not in models:
        raise ConfigError(f'no real configuration {name!r}; known: {sorted(models)} or a '
                          f'family of {sorted(STUDENTS)}')
    return models[name]


def load_real(name: str, device: str = 'cpu', dtype: str | None = None) -> MLLM:
    """Load ``real:<name>`` with its declared trainable set (see the module docstring), random
    weights.

    Args:
        name: Configuration or family name (see :func:`real_model`).
        device: Torch device; ``'meta'`` for shapes only.
        dtype: Weights dtype name (default float32).
    """
    from cdcca_ros.models import bundled

    return bundled.load(real_model(name).spec, device=device, dtype=dtype)


def count_params(model: MLLM, trainable: bool = False) -> int:
    """Parameters of ``model`` (tied tensors once); with ``trainable`` only the trainable set.

    LoRA matrices added by the trainable set are not part of the published model, so they are
    left out of the total.
    """
    params = dict(model.torch_model.named_parameters())
    if trainable:
        return sum(p.numel() for p in model.trainable_parameters().values())  # type: ignore
    return sum(p.numel() for name, p in params.items() if 'lora_' not in name)


def materialize(name: str, out_dir: str | Path, dtype: str = 'bfloat16') -> Path:
    """Initialise ``real:<name>`` with random weights and save it as a normal model directory
    (weights, tokenizer, ``cdcca.json``), so that it loads quantized through bitsandbytes
    (``load_model(out_dir, quantization='4bit', device='cuda')``) like a downloaded one.

    Returns:
        ``out_dir``.
    """
    model = load_real(name, dtype=dtype)
    trainable = model.trainable_config
    model.trainable_config = None  # the saved base carries no adapter
    out = Path(out_dir)
    model.save(out)
    if trainable is not None:
        # ... but declares the configuration's trainable set, as the configuration does.
        meta_path = out / 'cdcca.json'
        meta = json.loads(meta_path.read_text())
        meta['trainable_set'] = trainable.to_dict()
        meta_path.write_text(json.dumps(meta, indent=2) + '\n')
    return out
