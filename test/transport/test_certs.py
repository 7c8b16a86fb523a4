"""Certificates: the CLI writes a CA, router/cloud/device certs, 0600 keys, never overwrites."""
from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdcca_ros.errors import ConfigError
from cdcca_ros.transport.certs import common_name, create_certificates, main


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_cli_writes_a_chain_with_private_keys_0600(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / 'pki'
    assert main(['--out', str(out), '--cloud', 'cloud', '--devices', 'robot1', 'robot2',
                 '--router-host', 'localhost', '127.0.0.1', 'router.example']) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {f'{n}.{e}' for n in ('ca', 'router', 'cloud', 'robot1', 'robot2')
                     for e in ('crt', 'key')}
    for key in out.glob('*.key'):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = _load(out / 'ca.crt')
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ('router', 'cloud', 'robot1', 'robot2'):
        cert = _load(out / f'{name}.crt')
        cert.verify_directly_issued_by(ca)  # raises if the signature is wrong
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == 'secp256r1'
        assert common_name(out / f'{name}.crt') == name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert (ExtendedKeyUsageOID.SERVER_AUTH in eku) == (name == 'router')
    san = _load(out / 'router.crt').extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ['localhost', 'router.example']
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address('127.0.0.1')]
    assert str(out / 'robot1.key') in capsys.readouterr().out


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    create_certificates(tmp_path, devices=['robot1'])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match='refusing to overwrite.*robot1'):
        create_certificates(tmp_path, devices=['robot2', 'robot1'])
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # robot2 not written
    assert main(['--out', str(tmp_path), '--devices', 'robot1']) == 2


def test_existing_ca_issues_only_new_devices(tmp_path: Path) -> None:
    create_certificates(tmp_path, devices=['robot1'])
    ca_before = (tmp_path / 'ca.crt').read_bytes()
    written = create_certificates(tmp_path, devices=['robot9'])
    assert sorted(p.name for p in written) == ['robot9.crt', 'robot9.key']
    assert (tmp_path / 'ca.crt').read_bytes() == ca_before
    _load(tmp_path / 'robot9.crt').verify_directly_issued_by(_load(tmp_path / 'ca.crt'))
    subject = _load(tmp_path / 'robot9.crt').subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'robot9'


@pytest.mark.parametrize('devices, match', [
    (['robot1', 'robot1'], 'unique'),
    (['cloud'], 'unique'),
    (['ca'], 'reserved'),
    (['router'], 'reserved'),
    (['robot/1'], 'device id'),
])
def test_bad_names_are_refused_before_writing(tmp_path: Path, devices: list[str],
                                              match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_certificates(tmp_path / 'x', devices=devices)
    assert not (tmp_path / 'x').exists()


def test_help_says_which_files_go_to_which_machine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(['--help'])
    text = capsys.readouterr().out
    assert 'never copy ca.key' in text
    assert 'each robot:       ca.crt  <device>.crt <device>.key' in text
    assert 'scp DIR/ca.crt DIR/robot7.crt DIR/robot7.key' in text  # not the whole folder
