"""A Zenoh router as a Python session in router mode (there is no ``zenohd`` on PyPI).

Enough for tests and a small deployment; a fleet would run the official ``zenohd`` with the
same configuration (``python -m cdcca_ros.transport.router ... --print-config`` prints it).

Run::

    python -m cdcca_ros.transport.router --certs DIR --listen tls/127.0.0.1:7447 \\
        --devices robot1 robot2 [--cloud cloud]

It prints one line ``READY <endpoints>`` on stdout once it listens, and runs until SIGINT or
SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from cdcca_ros.errors import ConfigError, LinkError
from cdcca_ros.transport.config import RouterConfig, to_zenoh_config


class Router:
    """A running router session; use as a context manager or call :meth:`close`."""

    def __init__(self, config: RouterConfig) -> None:
        import zenoh

        self.config = config
        try:
            self._session: Any = zenoh.open(to_zenoh_config(config.to_dict()))
        except zenoh.ZError as err:
            raise LinkError(f'router cannot listen on {list(config.listen)}: {err}') from err

    def close(self) -> None:
        """Stop routing and release the endpoints."""
        if not self._session.is_closed():
            self._session.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.transport.router',
                                     description='Run the link router (mTLS + access control).')
    parser.add_argument('--certs', required=True, help='directory written by transport.certs')
    parser.add_argument('--listen', nargs='+', required=True, help='e.g. tls/127.0.0.1:7447')
    parser.add_argument('--devices', nargs='*', default=[], help='device ids to admit')
    parser.add_argument('--cloud', nargs='+', default=['cloud'], help='cloud certificate names')
    parser.add_argument('--prefix', default='cdcca', help='key prefix')
    parser.add_argument('--lease-ms', type=int, default=10000, help='link lease in ms')
    parser.add_argument('--print-config', action='store_true',
                        help='print the Zenoh configuration as JSON and exit')
    args = parser.parse_args(argv)
    try:
        config = RouterConfig(certs_dir=args.certs, listen=args.listen, devices=args.devices,
                              cloud_names=args.cloud, prefix=args.prefix,
                              lease_ms=args.lease_ms)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        router = Router(config)
    except (ConfigError, LinkError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f'READY {" ".join(config.listen)}', flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        router.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
