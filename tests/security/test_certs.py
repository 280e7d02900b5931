"""`shortline certs DIR`: a CA and one certificate per identity, private keys private,
and an existing CA never replaced without --force."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shortline.certs import CertsError, ensure
from shortline.cli import main
from shortline.common import tls


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_and_identities_are_written_with_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    code = main(
        [
            "certs",
            str(out),
            "--workers",
            "3",
            "--names",
            "ops,launcher",
            "--hosts",
            "sched.internal,10.1.2.3",
            "--days",
            "7",
        ]
    )
    assert code == 0
    names = ["scheduler", "predictor", "worker-1", "worker-2", "worker-3", "ops", "launcher"]
    printed = capsys.readouterr().out.split()
    expected = [out / "ca.pem", out / "ca.key"] + [
        out / f"{n}.{ext}" for n in names for ext in ("pem", "key")
    ]
    assert printed == [str(p) for p in expected]  # what it wrote, paths only
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path

    ca = _cert(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in names:
        cert = _cert(out / f"{name}.pem")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert tls.common_name((out / f"{name}.pem").read_bytes()) == name
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name, "localhost", "sched.internal"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
            "127.0.0.1",
            "10.1.2.3",
        ]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400
        assert 7 <= days < 7.01
        # Each pair loads as a service's TLS settings (key matches certificate).
        material = tls.load(
            tls.TlsSettings(
                tls_cert=str(out / f"{name}.pem"),
                tls_key=str(out / f"{name}.key"),
                tls_ca=str(out / "ca.pem"),
            )
        )
        assert material.mutual and material.identity == name


def test_existing_ca_is_kept_and_new_identities_signed_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", str(tmp_path), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()

    assert main(["certs", str(tmp_path), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "worker-2.pem"), str(tmp_path / "worker-2.key")]
    assert "kept the existing CA" in captured.err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name, data in before.items():
        assert after[name] == data, f"{name} was overwritten without --force"
    _cert(tmp_path / "worker-2.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))

    assert main(["certs", str(tmp_path), "--workers", "2", "--force"]) == 0
    forced = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert forced["ca.pem"] != before["ca.pem"] and forced["ca.key"] != before["ca.key"]
    new_ca = _cert(tmp_path / "ca.pem")
    for name in ("scheduler", "predictor", "worker-1", "worker-2"):
        _cert(tmp_path / f"{name}.pem").verify_directly_issued_by(new_ca)


def test_a_ca_without_its_key_is_not_replaced_silently(tmp_path: Path) -> None:
    ensure(tmp_path, ["scheduler"])
    (tmp_path / "ca.key").unlink()
    ca = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CertsError, match=r"ca\.key does not"):
        ensure(tmp_path, ["scheduler", "worker-9"])
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert main(["certs", str(tmp_path)]) == 1


def test_bad_identity_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="must match"):
        ensure(tmp_path, ["../escape"])
    assert not (tmp_path / "ca.pem").exists()
