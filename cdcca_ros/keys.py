"""Key management for signed cloud -> device records: root key, signing keys, key lists.

``python -m cdcca_ros.keys COMMAND ...``:

* ``root --out DIR``: a root key pair (``root_private.pem``, mode 0600, to keep offline;
  ``root_public.pem``, flashed on every device as ``device.trust_root``).
* ``signing --out DIR [--name NAME]``: a signing key pair for the cloud (``NAME.pem``,
  ``NAME.pub.pem``); prints its key id.
* ``key-list --root ROOT.pem --version N --expires-days D --key PUB.pem[=ROLES] ...
  [--revoke KEY_ID_OR_PUB.pem ...] --out FILE``: a key list signed by the root (roles:
  comma-separated, default ``delta,rollback``).
* ``show FILE [--root ROOT_PUBLIC.pem]``: print a key list, checking its signature when the
  root's public key is given.

Rotation procedure (no re-flashing): see the README, section "Rotating the cloud's signing key".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cdcca_ros.core import wire
from cdcca_ros.core.trust import ROLES, KeyList, key_id
from cdcca_ros.errors import CdccaError, ConfigError

_DAY_S = 24 * 3600


def _key_arg(text: str) -> tuple[Path, list[str]]:
    path, _, roles = text.partition('=')
    return Path(path), [r for r in roles.split(',') if r] or sorted(ROLES)


def _revoked_id(text: str) -> str:
    if Path(text).is_file():
        return key_id(wire.load_public_key(text))
    if len(text) != 32 or any(c not in '0123456789abcdef' for c in text):
        raise ConfigError(f'--revoke {text!r}: not a public key file nor a 32-digit key id')
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.keys', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('root', help='generate the root key pair')
    p.add_argument('--out', type=Path, required=True)
    p = sub.add_parser('signing', help='generate a signing key pair for the cloud')
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--name', default='cloud_signing_key')
    p = sub.add_parser('key-list', help='sign a key list with the root key')
    p.add_argument('--root', type=Path, required=True, help='root private key (PEM)')
    p.add_argument('--version', type=int, required=True)
    p.add_argument('--expires-days', type=float, default=365.0)
    p.add_argument('--key', action='append', default=[], type=_key_arg,
                   help='PUBLIC.pem[=role,role] (repeat)')
    p.add_argument('--revoke', action='append', default=[],
                   help='key id or public key file to revoke (repeat)')
    p.add_argument('--out', type=Path, required=True)
    p = sub.add_parser('show', help='print (and check) a key list')
    p.add_argument('file', type=Path)
    p.add_argument('--root', type=Path, help='root public key (PEM) to check it against')
    args = parser.parse_args(argv)
    try:
        if args.command == 'root':
            args.out.mkdir(parents=True, exist_ok=True)
            private, public = wire.generate_keypair()
            wire.save_private_key(private, args.out / 'root_private.pem')
            wire.save_public_key(public, args.out / 'root_public.pem')
            print(f'root key {key_id(public)}: {args.out / "root_private.pem"} (keep offline), '
                  f'{args.out / "root_public.pem"} (device.trust_root)')
        elif args.command == 'signing':
            args.out.mkdir(parents=True, exist_ok=True)
            private, public = wire.generate_keypair()
            wire.save_private_key(private, args.out / f'{args.name}.pem')
            wire.save_public_key(public, args.out / f'{args.name}.pub.pem')
            print(f'signing key {key_id(public)}: {args.out / f"{args.name}.pem"} '
                  f'(cloud.signing_key), {args.out / f"{args.name}.pub.pem"} (for key-list)')
        elif args.command == 'key-list':
            root = wire.load_private_key(args.root)
            keys = [(wire.load_public_key(path), roles) for path, roles in args.key]
            doc = KeyList.create(root, version=args.version,
                                 expires=int(time.time() + args.expires_days * _DAY_S),
                                 keys=keys, revoked=[_revoked_id(r) for r in args.revoke])
            if args.out.exists():
                raise ConfigError(f'{args.out} exists: choose another file name')
            args.out.write_bytes(doc.encode())
            print(f'key list v{doc.version} ({len(doc.keys)} keys, {len(doc.revoked)} revoked, '
                  f'expires {time.strftime("%Y-%m-%d", time.gmtime(doc.expires))}): {args.out}')
        else:
            doc = KeyList.decode(args.file.read_bytes())
            if args.root is not None:
                doc.verify(wire.load_public_key(args.root))
            print(json.dumps({'version': doc.version, 'expires': doc.expires,
                              'expires_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                           time.gmtime(doc.expires)),
                              'root': doc.root_id,
                              'signature': 'verified' if args.root else 'not checked',
                              'keys': {k: sorted(e.roles) for k, e in doc.keys.items()},
                              'revoked': sorted(doc.revoked)}, indent=2))
    except (CdccaError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
