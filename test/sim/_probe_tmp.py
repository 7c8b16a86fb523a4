"""Probe: does the drift hurt a source-only model while staying learnable? (not committed)

usage: simprobe.py [json]   json keys: n_train, epochs, n_test, workers, settings
settings: {setting name: {domain name: [[shift, strength], ...]}} drifted-domain variants; each
setting gets its own all-domains model. Without settings, the registered domains are used.
"""
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.environ.get('CDCCA_ROOT', '/work/main'))
from cdcca_ros.sim import DRIFTED, SOURCE, World, answer_space, vocabulary  # noqa: E402
from cdcca_ros.sim.domains import Domain, get_domain  # noqa: E402
from cdcca_ros.sim.questions import QTYPES, tokenize  # noqa: E402

VOCAB = {w: i + 1 for i, w in enumerate(vocabulary())}
ANS = {a: i for i, a in enumerate(answer_space())}
DEV = 'cuda' if torch.cuda.is_available() else 'cpu'


def gen(args):
    seed, dom, n, start = args
    dom = Domain(**dom) if isinstance(dom, dict) else dom
    ss = World(seed).samples(dom, n, start=start)
    x = np.stack([s.image for s in ss]).transpose(0, 3, 1, 2)
    q = np.zeros((n, 12), np.int64)
    for i, s in enumerate(ss):
        ids = [VOCAB[t] for t in tokenize(s.question)][:12]
        q[i, :len(ids)] = ids
    y = np.array([ANS[s.answer] for s in ss])
    t = np.array([QTYPES.index(s.qtype) for s in ss])
    return x, q, y, t


def make(pool, seed, dom, n, start=0, chunk=1000):
    d = {'name': dom.name, 'shifts': dom.shifts}
    jobs = [(seed, d, min(chunk, n - i), start + i) for i in range(0, n, chunk)]
    parts = list(pool.map(gen, jobs))
    return tuple(torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in range(4))


class Net(nn.Module):
    def __init__(self, w=1):
        super().__init__()
        c1, c2, c3, c4 = 16 * w, 32 * w, 48 * w, 16 * w
        self.conv = nn.Sequential(
            nn.Conv2d(3, c1, 3, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, 2, 1), nn.BatchNorm2d(c3), nn.ReLU())
        self.emb = nn.EmbeddingBag(len(VOCAB) + 1, c3, mode='mean', padding_idx=0)
        self.film = nn.Linear(c3, 2 * c3)
        self.conv2 = nn.Sequential(nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(c3, c4, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(c4 * 64 + c3, 128), nn.ReLU(),
                                  nn.Linear(128, len(ANS)))

    def forward(self, x, q):
        f = self.conv(x.float() / 255.0)
        e = self.emb(q)
        g, b = self.film(e).chunk(2, dim=1)
        f = f * (1 + g[..., None, None]) + b[..., None, None]
        f = self.conv2(f).flatten(1)
        return self.head(torch.cat([f, e], 1))


def train(data, epochs, bs=128, width=1):
    x, q, y, _ = (d.to(DEV) for d in data)
    torch.manual_seed(0)
    net = Net(width).to(DEV)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    steps = epochs * (len(y) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    net.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(y), device=DEV)
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i:i + bs]
            loss = nn.functional.cross_entropy(net(x[idx], q[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    print(f'    trained {epochs} epochs on {len(y)}: loss {loss.item():.3f} '
          f'{time.perf_counter() - t0:.0f}s', flush=True)
    net.eval()
    return net


@torch.no_grad()
def evaluate(net, x, q, y, t):
    pred = torch.cat([net(x[i:i + 1000].to(DEV), q[i:i + 1000].to(DEV)).argmax(1).cpu()
                      for i in range(0, len(y), 1000)])
    ok = (pred == y).float()
    return ok.mean().item(), {QTYPES[k]: ok[t == k].mean().item() for k in range(5)}


def show(name, acc, per_t):
    print(f'  {name:14s} {100 * acc:5.1f}  ' +
          ' '.join(f'{k}={100 * v:4.0f}' for k, v in per_t.items()), flush=True)


def main():
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    n_train, epochs = cfg.get('n_train', 12000), cfg.get('epochs', 8)
    n_test = cfg.get('n_test', 500)
    torch.set_num_threads(cfg.get('threads', 2))
    settings = cfg.get('settings') or {'registered': {d: get_domain(d).shifts for d in DRIFTED}}
    with ProcessPoolExecutor(cfg.get('workers', 2)) as pool:
        t0 = time.perf_counter()
        src = make(pool, 1, get_domain(SOURCE), n_train)
        tests = {SOURCE: make(pool, 2, get_domain(SOURCE), n_test)}
        for sname, doms in settings.items():
            for d, sh in doms.items():
                tests[f'{d}/{sname}'] = make(pool, 2, Domain(d, tuple(map(tuple, sh))), n_test)
        print(f'data {time.perf_counter() - t0:.1f}s', flush=True)
        print('source-only:', flush=True)
        net = train(src, epochs, width=cfg.get('width', 1))
        for k, v in tests.items():
            show(k, *evaluate(net, *v))
        for sname, doms in settings.items():
            per = n_train // (len(doms) + 1)
            parts = [make(pool, 1, get_domain(SOURCE), per, start=10 ** 6)]
            parts += [make(pool, 1, Domain(d, tuple(map(tuple, sh))), per, start=10 ** 6)
                      for d, sh in doms.items()]
            mix = tuple(torch.cat([p[k] for p in parts]) for k in range(4))
            print(f'all-domains ({sname}):', flush=True)
            net = train(mix, epochs, width=cfg.get('width', 1))
            for k, v in tests.items():
                if k == SOURCE or k.endswith('/' + sname):
                    show(k, *evaluate(net, *v))


if __name__ == '__main__':
    main()
