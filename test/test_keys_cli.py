"""The key-management CLI, following the README's rotation procedure step by step."""
from __future__ import annotations

import json

from cdcca_ros import keys as cli
from cdcca_ros.core import wire
from cdcca_ros.core.trust import ROLE_DELTA, KeyList, TrustStore, key_id


def test_rotation_procedure_of_the_readme(tmp_path, capsys) -> None:
    root, etc = tmp_path / 'root', tmp_path / 'etc'
    assert cli.main(['root', '--out', str(root)]) == 0
    assert cli.main(['signing', '--out', str(etc), '--name', 'k1']) == 0
    assert cli.main(['key-list', '--root', str(root / 'root_private.pem'), '--version', '1',
                     '--key', f'{etc / "k1.pub.pem"}=delta,rollback',
                     '--out', str(etc / 'keys-v1.json')]) == 0
    assert cli.main(['signing', '--out', str(etc), '--name', 'k2']) == 0
    assert cli.main(['key-list', '--root', str(root / 'root_private.pem'), '--version', '2',
                     '--key', f'{etc / "k2.pub.pem"}=delta', '--revoke', str(etc / 'k1.pub.pem'),
                     '--expires-days', '30', '--out', str(etc / 'keys-v2.json')]) == 0
    capsys.readouterr()
    assert cli.main(['show', str(etc / 'keys-v2.json'), '--root',
                     str(root / 'root_public.pem')]) == 0
    shown = json.loads(capsys.readouterr().out)
    k1 = key_id(wire.load_public_key(etc / 'k1.pub.pem'))
    k2 = key_id(wire.load_public_key(etc / 'k2.pub.pem'))
    assert shown['signature'] == 'verified' and shown['revoked'] == [k1]
    assert shown['keys'] == {k2: [ROLE_DELTA]}
    store = TrustStore(wire.load_public_key(root / 'root_public.pem'),
                       key_list=(etc / 'keys-v1.json').read_bytes())
    assert store.update((etc / 'keys-v2.json').read_bytes())
    assert store.key_list.revoked == {k1}
    # Refusals: an existing output file, a key list checked against the wrong root.
    assert cli.main(['key-list', '--root', str(root / 'root_private.pem'), '--version', '3',
                     '--out', str(etc / 'keys-v2.json')]) == 1
    assert cli.main(['show', str(etc / 'keys-v2.json'), '--root', str(etc / 'k1.pub.pem')]) == 1
    assert 'signed by root' in capsys.readouterr().err
    assert KeyList.decode((etc / 'keys-v1.json').read_bytes()).version == 1
