"""cloud_node's signer: the key list it attaches must let its signing key sign deltas."""
from __future__ import annotations

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')


def test_cloud_signer_checks_its_key_list(tmp_path) -> None:
    from cdcca_ros.core import wire
    from cdcca_ros.core.trust import ROLE_DELTA, ROLE_ROLLBACK, KeyList
    from cdcca_ros.errors import ConfigError
    from cdcca_ros.nodes.cloud_node import cloud_signer
    from cdcca_ros.nodes.tables import defaults

    root, _ = wire.generate_keypair()
    key, public = wire.generate_keypair()
    wire.save_private_key(key, tmp_path / 'k.pem')
    params = dict(defaults('cloud_node'), signing_key=str(tmp_path / 'k.pem'), delta_ttl_s=60)
    signer = cloud_signer(params, tmp_path)
    assert signer.key_list == b'' and signer.ttl_s == 60
    for roles, ok in (([ROLE_DELTA], True), ([ROLE_ROLLBACK], False)):
        path = tmp_path / f'list-{roles[0]}.json'
        path.write_bytes(KeyList.create(root, version=1, expires=2**40,
                                        keys=[(public, roles)]).encode())
        params['key_list'] = str(path)
        if ok:
            assert cloud_signer(params, tmp_path).key_list == path.read_bytes()
        else:
            with pytest.raises(ConfigError, match='does not let the signing key'):
                cloud_signer(params, tmp_path)
    params['key_list'] = str(tmp_path / 'missing.json')
    with pytest.raises(ConfigError, match='cannot use key list'):
        cloud_signer(params, tmp_path)
