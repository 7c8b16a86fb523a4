"""``python -m cdcca_ros.bench NAME --out FILE.json [--seed S] [--quick] [...]``.

``NAME`` is one of :data:`cdcca_ros.bench.common.BENCHES`; ``--help`` after it lists that
bench's arguments. Two more commands:

* ``list``: the benches and what they measure.
* ``report [--out-dir DIR] [--only a,b] [--no-run] [ARGS...]``: run every bench (each in its own
  process, so thread settings and memory do not leak between them) into ``DIR/<name>.json``
  (default ``bench/results``), then write ``DIR/REPORT.md``: every target with its measured
  figure. Any further arguments (``--quick``, ``--teacher ...``) are passed to every bench.
  ``--no-run`` only rewrites the report from the JSON files already in ``DIR``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdcca_ros.bench.common import BENCHES, fmt, format_table, load_bench
from cdcca_ros.errors import ConfigError

REPORT_FILE = 'REPORT.md'

USAGE = """usage: python -m cdcca_ros.bench NAME --out FILE.json [--seed S] [--quick] [...]
       python -m cdcca_ros.bench list
       python -m cdcca_ros.bench report [--out-dir DIR] [--only a,b] [--no-run] [ARGS...]

Run one benchmark: it prints a table and writes FILE.json (a "summary" with its figures).
`python -m cdcca_ros.bench NAME --help` lists that bench's own arguments.

  list     the benches and what each measures
  report   run every bench (each in its own process) into DIR/<name>.json (default
           bench/results), then write DIR/REPORT.md: every target with its measured figure;
           further ARGS (--quick, --teacher ...) go to every bench; --no-run only rewrites
           the report from the JSON files already in DIR
"""


def render_report(records: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown report: one table of every target, then each bench's own table and notes."""
    lines = ['# cdcca_ros benchmarks', '',
             'Figures are ratios measured within one run (both sides interleaved), so the '
             'load of the shared machine affects both alike.', '',
             '| bench | figure | target | measured | met |', '|---|---|---|---|---|']
    for name, rec in records.items():
        for t in rec.get('targets', []):
            met = {True: 'yes', False: '**no**', None: '-'}[t.get('met')]
            lines.append(f'| {name} | `{t["key"]}` | {t["op"]} {t["value"]:g} '
                         f'| {fmt(t.get("measured"))} | {met} |')
    for name, rec in records.items():
        machine = rec.get('machine', {})
        lines += ['', f'## {name}', '', rec.get('description', ''), '',
                  f'seed {rec.get("seed")}, quick={rec.get("quick")}, models '
                  f'{rec.get("models")}, {machine.get("cpu_count")} CPUs, torch '
                  f'{machine.get("torch")} ({machine.get("torch_threads")} threads), load '
                  f'{machine.get("loadavg")}, {rec.get("duration_s")} s', '']
        table = rec.get('table') or {}
        markdown = (rec.get('detail') or {}).get('markdown')
        if isinstance(markdown, str) and markdown.strip():
            lines += [markdown.rstrip(), '']  # the bench's own Markdown table renders best
        elif table.get('rows'):
            lines += ['```', format_table(table['headers'], table['rows']), '```']
        for note in rec.get('notes', []):
            lines.append(f'- {note}')
    return '\n'.join(lines) + '\n'


def _report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.bench report',
                                     description='run every bench and write the report')
    parser.add_argument('--out-dir', type=Path, default=Path('bench/results'),
                        help='where the JSON files and REPORT.md go (default: %(default)s)')
    parser.add_argument('--only', default='', help='comma-separated bench names (default: all)')
    parser.add_argument('--no-run', action='store_true',
                        help='rewrite the report from the JSON files already in --out-dir')
    args, passthrough = parser.parse_known_args(list(argv))
    names = [n for n in args.only.split(',') if n] or list(BENCHES)
    for name in names:
        load_bench(name)  # unknown names fail before anything runs
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    failed = []
    for name in names:
        out = args.out_dir / f'{name}.json'
        if args.no_run:
            if out.is_file():
                records[name] = json.loads(out.read_text())
            continue
        code = subprocess.call([sys.executable, '-m', 'cdcca_ros.bench', name, '--out',
                                str(out), *passthrough])
        if code != 0 or not out.is_file():
            failed.append(name)
            continue
        records[name] = json.loads(out.read_text())
    report = args.out_dir / REPORT_FILE
    report.write_text(render_report(records))
    print(f'wrote {report}' + (f'; failed: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a bench, ``list`` or ``report``."""
    from cdcca_ros.bench.common import run_bench

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        print('benches: ' + ', '.join(BENCHES))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == 'list':
        for bench in BENCHES:
            print(f'{bench:14s} {load_bench(bench).DESCRIPTION}')
        return 0
    if name == 'report':
        return _report(rest)
    try:
        run_bench(name, rest)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
