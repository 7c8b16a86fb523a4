"""The anchor set: what the student must keep knowing while it adapts (no rclpy).

Adapting to fog must not erase the source domain. The cloud keeps a fixed set of samples
from the student's own training distribution and trains on them in every round, labelled
with **the base student's own answers** (its original behaviour is distilled back; no ground
truth is needed), and the update gate checks that the held-out part of the set does not fall.

Where it comes from in a deployment (``anchor`` parameter of the cloud node):

- an ``anchor.safetensors`` shipped inside the student's model directory (the bundled
  student has one: source-domain scenes of its own training range), used by default;
- a file of your own: ``anchor.safetensors`` with a ``tokens`` tensor ``[N, T, D]`` (vision
  tokens from the shared encoder, all ``T`` of them) and metadata ``questions`` (a JSON
  list of ``N`` strings) and optionally ``answers`` (used instead of the base student's);
  :func:`write_anchor` writes one from images, e.g. a calibration set from the robot's
  first day;
- ``none``: no anchor (the gate then checks the replay slices only).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cdcca_ros.core.rounds.memory import Record, split_of
from cdcca_ros.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import Tensor

    from cdcca_ros.models.base import MLLM

ANCHOR_FILE = 'anchor.safetensors'
ANCHOR_FORMAT = 'cdcca-anchor-v1'
NONE = 'none'


def write_anchor(path: str | Path, tokens: Tensor, questions: Sequence[str],
                 answers: Sequence[str] | None = None, description: str = '') -> None:
    """Write an anchor file (float16 tokens, questions, optional answers).

    Raises:
        ConfigError: Lengths disagree or the tokens are not ``[N, T, D]``.
    """
    import torch
    from safetensors.torch import save_file

    if tokens.dim() != 3 or tokens.shape[0] != len(questions):
        raise ConfigError(f'anchor tokens {tuple(tokens.shape)} must be [N, T, D] with '
                          f'N = {len(questions)} questions')
    if answers is not None and len(answers) != len(questions):
        raise ConfigError(f'{len(answers)} anchor answers for {len(questions)} questions')
    meta = {'format': ANCHOR_FORMAT, 'questions': json.dumps(list(questions)),
            'description': description}
    if answers is not None:
        meta['answers'] = json.dumps(list(answers))
    save_file({'tokens': tokens.detach().to('cpu', torch.float16).contiguous()}, str(path),
              metadata=meta)


def write_anchor_from_images(path: str | Path, model: MLLM, images: Sequence[np.ndarray],
                             questions: Sequence[str], answers: Sequence[str] | None = None,
                             description: str = '', batch: int = 32) -> None:
    """Encode ``images`` with ``model``'s (shared) vision encoder and write an anchor file."""
    import torch

    with torch.no_grad():
        tokens = torch.cat([model.vision_tokens(list(images[i:i + batch]))
                            for i in range(0, len(images), batch)])
    write_anchor(path, tokens, questions, answers, description)


def read_anchor(path: str | Path) -> tuple[Tensor, list[str], list[str] | None]:
    """``(tokens [N, T, D] float16, questions, answers or None)`` of an anchor file.

    Raises:
        ConfigError: Missing, unreadable or malformed file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            tokens = f.get_tensor('tokens')
    except (OSError, SafetensorError) as err:
        raise ConfigError(f'cannot read anchor set {path}: {err}') from err
    if meta.get('format') != ANCHOR_FORMAT:
        raise ConfigError(f'{path} is not an anchor set (format {meta.get("format")!r})')
    try:
        questions = json.loads(meta['questions'])
        answers = json.loads(meta['answers']) if 'answers' in meta else None
    except (KeyError, ValueError) as err:
        raise ConfigError(f'anchor set {path}: bad metadata: {err}') from err
    if len(questions) != tokens.shape[0] or (answers is not None and
                                             len(answers) != len(questions)):
        raise ConfigError(f'anchor set {path}: {tokens.shape[0]} token rows, '
                          f'{len(questions)} questions')
    return tokens, [str(q) for q in questions], (None if answers is None
                                                 else [str(a) for a in answers])


def resolve_anchor(spec: str, student_source: str | None) -> Path | None:
    """The anchor file a cloud uses: ``''`` -> the student's own (if it ships one),
    ``'none'`` -> none, else the given path.

    Raises:
        ConfigError: A given path that does not exist.
    """
    if spec == NONE:
        return None
    if spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f'anchor set {spec!r} does not exist')
        return path
    if student_source and (Path(student_source) / ANCHOR_FILE).is_file():
        return Path(student_source) / ANCHOR_FILE
    return None


def anchor_records(path: Path, base_student: MLLM, val_fraction: float, gate_fraction: float,
                   max_new_tokens: int = 6, limit: int | None = None) -> list[Record]:
    """The anchor set as labelled records, split like the memory (ids ``anchor-<i>``).

    Labels: the file's answers when it has them, else the base student's own greedy
    answers (``base_student`` must hold the base trainable weights). Either way each record
    also carries the base student's answer distributions (:attr:`Record.soft`), what the
    round distils back.

    Raises:
        ConfigError: The file is unreadable or its tokens do not fit the student.
        ModelError: The student cannot answer them.
    """
    import torch

    tokens, questions, answers = read_anchor(path)
    if limit is not None:
        tokens, questions = tokens[:limit], questions[:limit]
        answers = None if answers is None else answers[:limit]
    space = base_student.vision_space()
    if tuple(tokens.shape[1:]) != (space.num_tokens, space.dim):
        raise ConfigError(f'anchor set {path}: tokens {tuple(tokens.shape[1:])} do not fit '
                          f'the student ({space.num_tokens} x {space.dim})')
    if answers is None:
        answers = _base_answers(base_student, tokens, questions, max_new_tokens)
    if len(answers) != len(questions):
        raise ModelError(f'the student gave {len(answers)} answers for {len(questions)} '
                         'anchor questions')
    own = _base_answers(base_student, tokens, questions, max_new_tokens)
    soft = base_distributions(base_student, tokens, questions, own)
    out = []
    for i, (t, q, a) in enumerate(zip(tokens, questions, answers, strict=True)):
        sid = f'anchor-{i}'
        out.append(Record(sample_id=sid, seq=-1, tokens=t.to(torch.float16), indices=None,
                          question=q, split=split_of(sid, val_fraction, gate_fraction),
                          label=a or None, confidence=1.0, label_tokens=int(t.shape[0]),
                          labelled=True, soft=soft[i]))
    return out


TOP_K = 32


def _base_answers(model: MLLM, tokens: Tensor, questions: Sequence[str],
                  max_new_tokens: int) -> list[str]:
    """The model's greedy answers (eval mode)."""
    import torch

    answers: list[str] = []
    was = model.torch_model.training
    model.torch_model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(questions), 64):
                results = model.answer_from_tokens(
                    tokens[start:start + 64].float(), None, list(questions[start:start + 64]),
                    max_new_tokens=max_new_tokens)
                answers += [r.text.strip() for r in results]
    finally:
        model.torch_model.train(was)
    return answers


def base_distributions(model: MLLM, tokens: Tensor, questions: Sequence[str],
                       answers: Sequence[str], top_k: int = TOP_K, batch: int = 64
                       ) -> list[tuple[Tensor, Tensor] | None]:
    """The model's (teacher-forced) distribution at each answer position of each sample,
    as its ``top_k`` entries ``(ids [A, k], probs [A, k])``; None for an empty answer."""
    import torch

    out: list[tuple[Tensor, Tensor] | None] = []
    was = model.torch_model.training
    model.torch_model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(questions), batch):
                qs = list(questions[start:start + batch])
                ans = list(answers[start:start + batch])
                rows = [i for i, a in enumerate(ans) if a]
                part: list[tuple[Tensor, Tensor] | None] = [None] * len(qs)
                if rows:
                    res = model.forward_train(tokens[start:start + batch][rows].float(), None,
                                              [qs[i] for i in rows], [ans[i] for i in rows])
                    for i, logits in zip(rows, answer_logits(res.logits, res.answer_mask),
                                         strict=True):
                        probs = logits.float().softmax(dim=-1)
                        k = min(top_k, probs.shape[-1])
                        top = probs.topk(k, dim=-1)
                        part[i] = (top.indices.clone(), top.values.to(torch.float16).clone())
                out += part
    finally:
        model.torch_model.train(was)
    return out


def answer_logits(logits: Tensor, answer_mask: Tensor) -> list[Tensor]:
    """Per row, the ``[a, V]`` logits that predict its ``a`` answer tokens (eos included).

    The model layer pads on the left, so every row ends at the last position and its answer
    tokens are predicted from positions ``S - a - 1 .. S - 2`` (as ``TrainOutputs.fused``).
    """
    seq = logits.shape[1]
    return [logits[b, seq - int(n) - 1:seq - 1]
            for b, n in enumerate(answer_mask.sum(dim=1).tolist())]
