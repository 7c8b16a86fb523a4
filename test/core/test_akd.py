"""Tests of cdcca_ros.core.akd: losses (Eq. 5-6) with hand-computed values, projectors,
config checks, and the trainer on small real networks that follow the MLLM contract."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cdcca_ros.core.akd import (
    AKDConfig,
    AkdSample,
    AKDTrainer,
    QueryProjector,
    ReprProjector,
    query_loss,
    repr_loss,
)
from cdcca_ros.core.uts import UtsConfig, UtsPipeline, answer_confidence, unpack_tokens
from cdcca_ros.errors import ConfigError, ModelError
from cdcca_ros.models.base import MLLM, AnswerResult, TrainableConfig, TrainOutputs, VisionSpace


# --- losses with hand-computed values -------------------------------------------------------
def test_query_loss_known_values() -> None:
    q_t = torch.zeros(2, 3, 4)
    assert query_loss(q_t, torch.ones(2, 3, 4)).item() == pytest.approx(1.0)
    q_s = torch.zeros(2, 3, 4)
    q_s[1, 2, 3] = 2.0                      # one squared error of 4 over B*L*C = 24
    assert query_loss(q_t, q_s).item() == pytest.approx(4 / 24)
    q_s = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert query_loss(q_s, q_s + 0.5).item() == pytest.approx(0.25)


def test_query_loss_gradient_reaches_student_only() -> None:
    q_t = torch.randn(1, 2, 3, requires_grad=True)
    q_s = torch.zeros(1, 2, 3, requires_grad=True)
    query_loss(q_t, q_s).backward()
    assert q_t.grad is None
    torch.testing.assert_close(q_s.grad, -2 * q_t.detach() / 6)


def test_repr_loss_masks_padding() -> None:
    h_t = torch.zeros(2, 3, 2)
    h_s = torch.full((2, 3, 2), float('nan'))   # padding may hold anything
    h_s[0, 0] = torch.tensor([1.0, 1.0])
    h_s[0, 1] = torch.tensor([2.0, 0.0])
    h_s[1, 0] = torch.tensor([0.0, 3.0])
    h_s.requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = repr_loss(h_t, h_s, mask)
    # (1 + 1 + 4 + 0 + 0 + 9) / (3 positions * 2 channels)
    assert loss.item() == pytest.approx(15 / 6)
    loss.backward()
    assert torch.isfinite(h_s.grad).all()
    assert torch.all(h_s.grad[~mask] == 0)
    torch.testing.assert_close(h_s.grad[0, 1], torch.tensor([2 * 2.0 / 6, 0.0]))


def test_repr_loss_empty_mask_is_zero_with_gradient() -> None:
    h_s = torch.randn(2, 3, 4, requires_grad=True)
    loss = repr_loss(torch.randn(2, 3, 4), h_s, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    loss.backward()
    assert torch.all(h_s.grad == 0)


@pytest.mark.parametrize('fn,args', [
    (query_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))),
    (query_loss, (torch.zeros(3, 4), torch.zeros(3, 4))),
    (repr_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4), torch.ones(2, 3, dtype=bool))),
    (repr_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=bool))),
])
def test_losses_reject_shape_mismatch(fn, args) -> None:
    with pytest.raises(ValueError):
        fn(*args)


def test_total_is_weighted_sum() -> None:
    cfg = AKDConfig(lambda_query=2.0, lambda_repr=0.5, lambda_ce=1.0)
    total = cfg.combine(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))
    assert total.item() == pytest.approx(2 * 1 + 0.5 * 2 + 1 * 3)


@pytest.mark.parametrize('kwargs,field', [
    ({'lambda_query': -1.0}, 'lambda_query'), ({'lambda_repr': float('nan')}, 'lambda_repr'),
    ({'lambda_query': 0.0, 'lambda_repr': 0.0, 'lambda_ce': 0.0}, 'all 0'),
    ({'lr': 0.0}, 'lr'), ({'steps': -1}, 'steps'), ({'batch_size': 0}, 'batch_size'),
    ({'grad_clip': 0.0}, 'grad_clip'), ({'weight_decay': -0.1}, 'weight_decay'),
    ({'max_new_tokens': 0}, 'max_new_tokens'),
])
def test_akd_config_rejects(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AKDConfig(**kwargs)


def test_projectors() -> None:
    same = QueryProjector(6, 6)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(same(x), x)          # identity start for equal widths
    wide = QueryProjector(4, 6)
    assert wide(torch.randn(2, 3, 4)).shape == (2, 3, 6)
    assert sum(p.numel() for p in ReprProjector(5, 5).parameters()) == 0
    assert ReprProjector(5, 5)(x[..., :5]) is not None
    assert ReprProjector(4, 7)(torch.randn(2, 4)).shape == (2, 7)
    with pytest.raises(ConfigError):
        QueryProjector(0, 3)


# --- a small real MLLM following the contract ------------------------------------------------
WORDS = ['what', 'colour', 'is', 'it', '?', 'red', 'green', 'blue', 'circle', 'square',
         'object']
SPECIALS = ['<pad>', '<bos>', '<eos>']
VOCAB = SPECIALS + WORDS
PAD, BOS, EOS = 0, 1, 2
COLOURS = ['red', 'green', 'blue']
SHAPES = ['circle', 'square']
GRID = (3, 3)


class TinyNet(nn.Module):
    """Vision tokens -> learned-query cross-attention (query stage) -> GRU language model."""

    def __init__(self, dim: int, num_tokens: int, queries: int, width: int, hidden: int,
                 vocab: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pos = nn.Embedding(num_tokens, dim)
        self.query_tokens = nn.Parameter(0.5 * torch.randn(queries, width))
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.query_norm = nn.LayerNorm(width)
        self.to_lm = nn.Linear(width, hidden)
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def attend(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attention probabilities ``[B, L, K]`` and values ``[B, K, width]``."""
        k, v = self.key(x), self.value(x)
        logits = self.query_tokens @ k.transpose(1, 2) / math.sqrt(k.shape[-1])
        return torch.softmax(logits, dim=-1), v

    def queries(self, tokens: Tensor, indices: Tensor) -> Tensor:
        attn, v = self.attend(tokens + self.pos(indices))
        return self.query_norm(self.query_tokens + attn @ v)


class TinyMLLM(MLLM):
    """A real (small) network behind the MLLM contract, for testing AKD without HF models."""

    family = 'tiny-test'

    def __init__(self, dim: int = 12, queries: int = 4, width: int = 16, hidden: int = 24,
                 seed: int = 0) -> None:
        self.space = VisionSpace(dim=dim, num_tokens=1 + GRID[0] * GRID[1], grid=GRID,
                                 has_cls=True, encoder='tiny-test-vit')
        self.torch_model = TinyNet(dim, self.space.num_tokens, queries, width, hidden,
                                   len(VOCAB), seed)
        self.tokenizer = {w: i for i, w in enumerate(VOCAB)}

    # -- helpers --
    def _ids(self, text: str) -> list[int]:
        return [self.tokenizer[w] for w in text.replace('?', ' ?').split()]

    def _indices(self, tokens: Tensor, indices: Tensor | None) -> Tensor:
        if indices is None:
            return torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        return indices

    def _prompt(self, tokens: Tensor, indices: Tensor | None,
                questions: Sequence[str]) -> Tensor:
        """``[B, L + Qmax + 1, H]`` inputs: queries, left-padded question, BOS."""
        net = self.torch_model
        q = net.to_lm(net.queries(tokens, self._indices(tokens, indices)))
        ids = [self._ids(text) for text in questions]
        width = max(len(i) for i in ids)
        padded = torch.tensor([[PAD] * (width - len(i)) + i + [BOS] for i in ids])
        return torch.cat([q, net.embed(padded)], dim=1)

    # -- contract --
    def vision_space(self) -> VisionSpace:
        return self.space

    def vision_tokens(self, images: Sequence[np.ndarray]) -> Tensor:
        # Mean colour per patch, tiled over the token width: a fixed "encoder".
        out = []
        for image in images:
            rows = np.array_split(np.asarray(image, dtype=np.float32) / 255.0, GRID[0], axis=0)
            patches = [c.mean(axis=(0, 1)) for r in rows
                       for c in np.array_split(r, GRID[1], axis=1)]
            feats = np.stack([np.mean(patches, axis=0)] + patches)
            out.append(np.resize(feats, (feats.shape[0], self.space.dim)))
        return torch.tensor(np.stack(out))

    def answer(self, images, questions, max_new_tokens=6) -> list[AnswerResult]:
        return self.answer_from_tokens(self.vision_tokens(images), None, questions,
                                       max_new_tokens)

    def answer_from_tokens(self, tokens, indices, questions,
                           max_new_tokens=6) -> list[AnswerResult]:
        start = time.perf_counter()
        net = self.torch_model
        results = []
        with torch.no_grad():
            prompt = self._prompt(tokens, indices, questions)
            out, state = net.rnn(prompt)
            last = out[:, -1]
            steps: list[list[np.ndarray]] = [[] for _ in questions]
            ids: list[list[int]] = [[] for _ in questions]
            done = [False] * len(questions)
            for _ in range(max_new_tokens):
                probs = torch.softmax(net.head(last), dim=-1)
                nxt = probs.argmax(dim=-1)
                for b in range(len(questions)):
                    if done[b]:
                        continue
                    steps[b].append(probs[b].numpy().astype(np.float32))
                    if int(nxt[b]) == EOS:
                        done[b] = True
                    else:
                        ids[b].append(int(nxt[b]))
                if all(done):
                    break
                out, state = net.rnn(net.embed(nxt)[:, None], state)
                last = out[:, -1]
        latency = (time.perf_counter() - start) * 1000.0
        for b in range(len(questions)):
            step_probs = np.stack(steps[b])
            chosen = step_probs[np.arange(len(ids[b])), ids[b]] if ids[b] else np.zeros(0)
            results.append(AnswerResult(
                text=' '.join(VOCAB[i] for i in ids[b]).strip(), token_ids=ids[b],
                step_probs=step_probs, token_probs=np.asarray(chosen, dtype=np.float32),
                latency_ms=latency))
        return results

    def forward_train(self, tokens, indices, questions, answers) -> TrainOutputs:
        net = self.torch_model
        prompt = self._prompt(tokens, indices, questions)
        targets = [self._ids(a) + [EOS] for a in answers]
        span = max(len(t) for t in targets)
        # Inputs after BOS are the answer tokens (teacher forcing), right-padded.
        feed = torch.tensor([t[:-1] + [PAD] * (span - len(t)) for t in targets])
        inputs = torch.cat([prompt, net.embed(feed)], dim=1)
        hidden, _ = net.rnn(inputs)
        logits = net.head(hidden)
        first = prompt.shape[1] - 1          # the BOS position predicts the first answer token
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
        mask = torch.zeros(len(answers), span, dtype=torch.bool)
        for b, t in enumerate(targets):
            labels[b, first:first + len(t)] = torch.tensor(t)
            mask[b, :len(t)] = True
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100)
        fused = hidden[:, first:first + span] * mask[..., None]
        query = net.queries(tokens, self._indices(tokens, indices))
        return TrainOutputs(loss=loss, logits=logits, query=query, fused=fused,
                            answer_mask=mask)

    def mc_token_features(self, tokens, p, num_masks, generator=None) -> Tensor:
        b, n, d = tokens.shape
        keep = (torch.rand(num_masks, b, n, d, generator=generator) >= p).float() / (1 - p)
        x = (tokens[None] * keep).reshape(num_masks * b, n, d)
        x = x + self.torch_model.pos(torch.arange(n))
        attn, v = self.torch_model.attend(x)
        return (attn.sum(dim=1)[..., None] * v).reshape(num_masks, b, n, -1)

    def configure_trainable(self, cfg: TrainableConfig) -> None:
        # No peft here: the "adapter" set is the LM (GRU + head) and the query tokens.
        for name, param in self.torch_model.named_parameters():
            param.requires_grad_(name.startswith(('rnn.', 'head.'))
                                 or (cfg.train_query_tokens and name == 'query_tokens'))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.torch_model.named_parameters()
                if p.requires_grad}

    def load_trainable_state_dict(self, sd: dict[str, Tensor]) -> None:
        params = dict(self.torch_model.named_parameters())
        with torch.no_grad():
            for name, value in sd.items():
                params[name].copy_(value)

    def save(self, path: str | Path) -> None:
        raise NotImplementedError('the test model is never saved')

    @classmethod
    def load(cls, path_or_hub_id, quantization=None, device='cpu') -> MLLM:
        raise NotImplementedError('the test model is never loaded')


def make_sample(colour: int, shape: int, gen: torch.Generator, dim: int = 12) -> Tensor:
    """``[N, D]`` tokens: a colour prototype in every patch, a shape prototype in the centre."""
    protos = torch.randn(len(COLOURS) + len(SHAPES), dim, generator=torch.Generator()
                         .manual_seed(42))
    tokens = 0.3 * torch.randn(1 + GRID[0] * GRID[1], dim, generator=gen)
    tokens[1:] += 1.5 * protos[colour]
    tokens[1 + 4] += 2.0 * protos[len(COLOURS) + shape]
    tokens[0] = tokens[1:].mean(0)
    return tokens


def make_dataset(count: int, seed: int) -> list[AkdSample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        colour, shape = i % 3, (i // 3) % 2
        tokens = make_sample(colour, shape, gen)
        if i % 2:
            samples.append(AkdSample(tokens, None, 'what colour is it ?', COLOURS[colour]))
        else:
            samples.append(AkdSample(tokens, None, 'what is it ?',
                                     f'{COLOURS[colour]} {SHAPES[shape]} object'))
    return samples


@pytest.fixture(scope='module', autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks gain nothing from threads; on a shared 2-core box they thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def teacher(one_thread: None) -> TinyMLLM:
    """A teacher trained for a moment on the toy task, so its pseudo-labels mean something."""
    model = TinyMLLM(width=24, hidden=32, seed=1)
    data = make_dataset(48, seed=0)
    opt = torch.optim.Adam(model.torch_model.parameters(), lr=2e-2)
    tokens = torch.stack([s.tokens for s in data])
    for _ in range(50):
        out = model.forward_train(tokens, None, [s.question for s in data],
                                  [s.answer for s in data])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.torch_model.eval()
    for param in model.torch_model.parameters():
        param.requires_grad_(False)
    return model


def make_student(**kwargs) -> TinyMLLM:
    student = TinyMLLM(**{'width': 16, 'hidden': 20, 'seed': 2, **kwargs})
    student.configure_trainable(TrainableConfig())
    return student


def test_teacher_pseudo_labels_are_its_answers(teacher: TinyMLLM) -> None:
    data = make_dataset(12, seed=5)
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(), progress=False)
    tokens = torch.stack([s.tokens for s in data])
    questions = [s.question for s in data]
    labels = trainer.pseudo_label(tokens, None, questions)
    assert labels == [r.text for r in teacher.answer_from_tokens(tokens, None, questions)]
    correct = sum(label == s.answer for label, s in zip(labels, data, strict=True))
    assert correct >= 10  # the trained teacher knows the task
    # label() fills missing answers and keeps given ones
    unlabelled = [AkdSample(s.tokens, None, s.question) for s in data[:5]]
    given = AkdSample(data[5].tokens, None, data[5].question, 'blue')
    out = trainer.label(unlabelled + [given])
    assert [s.answer for s in out] == labels[:5] + ['blue']


def test_label_drops_empty_pseudo_labels(teacher: TinyMLLM) -> None:
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(), progress=False)
    data = make_dataset(2, seed=1)
    data[0].answer = '  '
    assert [s.answer for s in trainer.label(data)] == [data[1].answer]


def test_answer_confidence_is_geometric_mean() -> None:
    assert answer_confidence([0.5, 0.125]) == pytest.approx(0.25)
    assert answer_confidence([]) == 0.0
    assert answer_confidence([0.0]) == pytest.approx(1e-12)


def test_label_drops_unsure_pseudo_labels(teacher: TinyMLLM) -> None:
    data = make_dataset(12, seed=5)
    tokens = torch.stack([s.tokens for s in data])
    questions = [s.question for s in data]
    scored = AKDTrainer(teacher, make_student(), AKDConfig(), progress=False
                        ).pseudo_label_scored(tokens, None, questions)
    expected = [answer_confidence(r.token_probs)
                for r in teacher.answer_from_tokens(tokens, None, questions)]
    assert [c for _, c in scored] == pytest.approx(expected)
    confidences = sorted(c for _, c in scored)
    assert confidences[0] < confidences[-1]  # the threshold below separates something
    threshold = (confidences[len(confidences) // 2 - 1] + confidences[len(confidences) // 2]) / 2
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(min_label_confidence=threshold),
                         progress=False)
    unlabelled = [AkdSample(s.tokens, None, s.question) for s in data]
    given = AkdSample(data[0].tokens, None, data[0].question, 'blue')  # given answers stay
    out = trainer.label(unlabelled + [given])
    keep = [text for text, c in scored if c >= threshold]
    assert [s.answer for s in out] == keep + ['blue']
    assert trainer.dropped_unsure == len(data) - len(keep) > 0


def test_akd_config_from_params() -> None:
    params = {'akd.lambda_query': 0.5, 'akd.lambda_repr': 0.0, 'akd.lambda_ce': 2.0,
              'akd.lr': 1e-3, 'akd.steps': 7, 'akd.batch_size': 3,
              'akd.min_label_confidence': 0.8, 'dwc.codec': 'sparse'}
    cfg = AKDConfig.from_params(params, steps=9)
    assert (cfg.lambda_query, cfg.lambda_repr, cfg.lambda_ce, cfg.lr, cfg.steps,
            cfg.batch_size, cfg.min_label_confidence) == (0.5, 0.0, 2.0, 1e-3, 9, 3, 0.8)
    with pytest.raises(ConfigError, match='min_label_confidence'):
        AKDConfig.from_params({**params, 'akd.min_label_confidence': 1.0})


def test_losses_match_independent_computation(teacher: TinyMLLM) -> None:
    student = make_student()
    cfg = AKDConfig(lambda_query=0.7, lambda_repr=0.3, lambda_ce=1.3)
    trainer = AKDTrainer(teacher, student, cfg, progress=False)
    data = make_dataset(4, seed=2)
    tokens = torch.stack([s.tokens for s in data])
    questions, answers = [s.question for s in data], [s.answer for s in data]
    out = trainer.losses(tokens, None, questions, answers)
    assert set(out) == {'total', 'query', 'repr', 'ce'}
    with torch.no_grad():
        t_out = teacher.forward_train(tokens, None, questions, answers)
        s_out = student.forward_train(tokens, None, questions, answers)
        q = ((t_out.query - trainer.query_projector(s_out.query)) ** 2).mean()
        h_s = trainer.repr_projector(s_out.fused)
        m = t_out.answer_mask
        r = ((t_out.fused - h_s) ** 2)[m].mean()
    assert trainer.query_projector.linear.weight.shape == (24, 16)   # C_s -> C_t
    assert trainer.repr_projector.linear.weight.shape == (32, 20)    # H_s -> H_t
    assert out['query'].item() == pytest.approx(q.item(), rel=1e-5)
    assert out['repr'].item() == pytest.approx(r.item(), rel=1e-5)
    assert out['ce'].item() == pytest.approx(s_out.loss.item(), rel=1e-5)
    assert out['total'].item() == pytest.approx(
        0.7 * q.item() + 0.3 * r.item() + 1.3 * s_out.loss.item(), rel=1e-5)


def test_fit_lowers_total_and_only_trains_the_student(teacher: TinyMLLM) -> None:
    student = make_student()
    data = make_dataset(12, seed=3)
    cfg = AKDConfig(lr=1e-2, steps=12, batch_size=12, seed=0)
    trainer = AKDTrainer(teacher, student, cfg, progress=False)
    teacher_before = {n: p.clone() for n, p in teacher.torch_model.named_parameters()}
    frozen_before = {n: p.clone() for n, p in student.torch_model.named_parameters()
                     if not p.requires_grad}
    trainable_before = student.trainable_state_dict()
    before = trainer.evaluate(data)
    history = trainer.fit(data)
    after = trainer.evaluate(data)
    assert len(history) == 12 and trainer.steps_done == 12
    assert all(set(h) == {'total', 'query', 'repr', 'ce'} for h in history)
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert after['total'] < 0.8 * before['total']
    for key in ('query', 'repr', 'ce'):
        assert after[key] < before[key]
    for name, param in teacher.torch_model.named_parameters():
        assert torch.equal(param, teacher_before[name]), name
    for name, param in student.torch_model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    changed = [n for n, v in student.trainable_state_dict().items()
               if not torch.equal(v, trainable_before[n])]
    assert sorted(changed) == sorted(trainable_before)


def test_one_step_lowers_total_on_a_fixed_batch(teacher: TinyMLLM) -> None:
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(lr=3e-3, train_mode=False),
                         progress=False)
    data = make_dataset(6, seed=4)
    tokens = torch.stack([s.tokens for s in data])
    batch = (tokens, None, [s.question for s in data], [s.answer for s in data])
    first = trainer.step(*batch)
    with torch.no_grad():
        second = trainer.losses(*batch)
    assert second['total'].item() < first['total']


def test_fit_is_reproducible_with_a_seed(teacher: TinyMLLM) -> None:
    data = make_dataset(9, seed=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        trainer = AKDTrainer(teacher, make_student(),
                             AKDConfig(steps=3, batch_size=4, seed=11), progress=False)
        runs.append(trainer.fit(data))
    assert runs[0] == runs[1]


def test_fit_groups_samples_with_different_kept_counts(teacher: TinyMLLM) -> None:
    data = make_dataset(8, seed=7)
    mixed = []
    for i, s in enumerate(data):
        kept = torch.tensor([0, 1, 4, 7]) if i % 2 else torch.tensor([0, 4, 5])
        mixed.append(AkdSample(s.tokens[kept], kept, s.question, s.answer))
    four, three = mixed[1::2], mixed[0::2]
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(steps=12, batch_size=8, lr=3e-3),
                         progress=False)
    stacked: list[set[int]] = []
    step = trainer.step

    def recording_step(tokens, indices, questions, answers):
        stacked.append({int(tokens.shape[1])})
        assert indices is not None and indices.shape == tokens.shape[:2]
        return step(tokens, indices, questions, answers)
    trainer.step = recording_step
    before = {n: trainer.evaluate(g)['total'] for n, g in (('four', four), ('three', three))}
    history = trainer.fit(mixed)
    assert len(history) == 12
    # Every batch stacks one group (4 or 3 kept tokens), and both groups were trained on ...
    assert set().union(*stacked) == {3, 4}
    # ... so the loss fell on each group, not only on the one the batches favoured.
    after = {n: trainer.evaluate(g)['total'] for n, g in (('four', four), ('three', three))}
    assert all(after[n] < 0.9 * before[n] for n in before), (before, after)


def test_equal_widths_use_identity_projectors(teacher: TinyMLLM) -> None:
    student = make_student(width=24, hidden=32)
    trainer = AKDTrainer(teacher, student, AKDConfig(steps=1), progress=False)
    trainer.fit(make_dataset(3, seed=8))
    assert trainer.repr_projector.linear is None
    assert trainer.query_projector.linear.weight.shape == (24, 24)


def test_student_without_trainable_parameters_is_refused(teacher: TinyMLLM) -> None:
    student = TinyMLLM()
    for param in student.torch_model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ModelError, match='configure_trainable'):
        AKDTrainer(teacher, student, AKDConfig())


def test_evaluate_needs_labels(teacher: TinyMLLM) -> None:
    trainer = AKDTrainer(teacher, make_student(), AKDConfig(), progress=False)
    with pytest.raises(ValueError, match='label'):
        trainer.evaluate([AkdSample(torch.zeros(10, 12), None, 'what is it ?')])


def test_uts_to_akd_round_trip(teacher: TinyMLLM) -> None:
    """Device: student answers, UTS keeps tokens; cloud: unpack, pseudo-label, distil."""
    student = make_student()
    gen = torch.Generator().manual_seed(0)
    pipe = UtsPipeline(
        UtsConfig(stage1_mode='top_fraction', stage1_fraction=1.0, keep_ratio=4 / 9,
                  pack_dtype='int8'),
        lambda t, p, m: student.mc_token_features(t, p, m, generator=gen),
        has_cls=student.vision_space().has_cls)
    uplink = []
    for sample in make_dataset(6, seed=9):
        [answer] = student.answer_from_tokens(sample.tokens[None], None, [sample.question])
        result = pipe.process(answer.step_probs, sample.tokens)
        assert result is not None
        assert result.kept_indices.tolist()[0] == 0 and len(result.kept_indices) == 5
        tokens = unpack_tokens(result.packed)
        # int8 with a scale per token: within half a step of the kept tokens.
        kept = sample.tokens[result.kept_indices]
        step = kept.abs().amax(dim=1, keepdim=True) / 127
        assert bool(((tokens - kept).abs() <= 0.5 * step + 1e-6).all())
        uplink.append(AkdSample(tokens, result.kept_indices, sample.question))
    trainer = AKDTrainer(teacher, student, AKDConfig(steps=20, batch_size=3, lr=3e-3),
                         progress=False)
    labelled = trainer.label(uplink)
    # The cloud labels from what was uplinked: its answers on those tokens alone.
    assert [s.answer for s in labelled] == [
        r.text for r in teacher.answer_from_tokens(
            torch.stack([s.tokens for s in uplink]), torch.stack([s.indices for s in uplink]),
            [s.question for s in uplink])]
    before = trainer.evaluate(labelled)
    history = trainer.fit(labelled)
    assert len(history) == 20
    after = trainer.evaluate(labelled)
    assert after['total'] < 0.9 * before['total'] and after['ce'] < before['ce'], (before, after)


# --- the real BLIP-2 family (tiny, offline) ----------------------------------------------------
BLIP_WORDS = ['what', 'colour', 'is', 'it', 'red', 'green', 'blue', 'circle', 'square']


@pytest.fixture(scope='module')
def blip2_pair(one_thread: None) -> tuple[MLLM, MLLM]:
    """A tiny BLIP-2 teacher and a narrower student sharing its vision encoder."""
    from cdcca_ros.models.registry import build_tiny, check_vision_space

    teacher = build_tiny('blip2', BLIP_WORDS, qformer_hidden=48, lm_hidden=64, dropout=0.0,
                         seed=1)
    student = build_tiny('blip2', BLIP_WORDS, qformer_hidden=32, lm_hidden=32, lm_layers=1,
                         dropout=0.0, seed=2, vision_from=teacher)
    check_vision_space(teacher, student)
    student.configure_trainable(TrainableConfig(lora_r=4))
    return teacher, student


def test_akd_on_tiny_blip2(blip2_pair: tuple[MLLM, MLLM]) -> None:
    teacher, student = blip2_pair
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    tokens = teacher.vision_tokens(images)
    questions = ['what colour is it'] * 4
    trainer = AKDTrainer(teacher, student, AKDConfig(lr=3e-3, steps=4, batch_size=4),
                         progress=False)
    labels = trainer.pseudo_label(tokens, None, questions)
    assert labels == [r.text for r in teacher.answer_from_tokens(tokens, None, questions)]
    # Explicit answers: a random teacher's pseudo-labels may be empty.
    samples = [AkdSample(tokens[i], None, questions[i], answer) for i, answer in
               enumerate(['red', 'green blue', 'circle', 'square red'])]
    teacher_before = [p.clone() for p in teacher.torch_model.parameters()]
    trainable_before = student.trainable_state_dict()
    before = trainer.evaluate(samples)
    history = trainer.fit(samples)
    after = trainer.evaluate(samples)
    assert len(history) == 4 and all(math.isfinite(h['total']) for h in history)
    assert after['total'] < before['total']
    assert trainer.query_projector.linear.weight.shape == (48, 32)  # Q-Former widths
    assert trainer.repr_projector.linear.weight.shape == (64, 32)   # LM widths
    assert all(torch.equal(a, b) for a, b in zip(teacher.torch_model.parameters(),
                                                 teacher_before, strict=False))
    assert any(not torch.equal(v, trainable_before[k])
               for k, v in student.trainable_state_dict().items())


def test_uts_on_tiny_blip2_kept_tokens_feed_akd(blip2_pair: tuple[MLLM, MLLM]) -> None:
    teacher, student = blip2_pair
    space = student.vision_space()
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    tokens = student.vision_tokens([image])[0]
    [answer] = student.answer_from_tokens(tokens[None], None, ['what colour is it'])
    gen = torch.Generator().manual_seed(0)
    pipe = UtsPipeline(
        UtsConfig(stage1_threshold=0.0, keep_ratio=0.25, pack_dtype='int8'),
        lambda t, p, m: student.mc_token_features(t, p, m, generator=gen),
        has_cls=space.has_cls)
    result = pipe.process(answer.step_probs, tokens)
    assert result is not None
    assert result.variance.shape == (space.num_tokens,)
    assert len(result.kept_indices) == 1 + math.ceil(0.25 * (space.num_tokens - 1))
    kept = unpack_tokens(result.packed)
    out = teacher.forward_train(kept[None], result.kept_indices[None], ['what colour is it'],
                                ['red'])
    assert torch.isfinite(out.loss)
