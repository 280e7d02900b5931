"""``shortline certs DIR``: a local CA and one certificate per service, for development.

What ``shortline up --tls`` uses, and what an operator can start from before
their own PKI. Every certificate names its identity twice: as the subject's
common name (the name the scheduler binds a worker id to, and the name
workers check Execute's caller against) and as a DNS name, beside
``localhost`` and ``127.0.0.1`` (and ``--hosts``), so the same file serves
both ends of a connection: EKU serverAuth and clientAuth. Keys are ECDSA
P-256, written mode 0600.

Files: ``DIR/ca.pem``, ``DIR/ca.key``, ``DIR/<identity>.pem``, ``DIR/<identity>.key``.
An existing CA is kept (new identities are signed by it) unless ``--force``;
an identity whose certificate is missing, expiring within a day or from
another CA is issued again.

Usage::

    shortline certs .run/certs --workers 2 --hosts sched.internal
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CA_NAME = "Shortline development CA"
# An identity expiring sooner than this is issued again rather than handed to a service.
RENEW_BEFORE = datetime.timedelta(days=1)


class CertsError(RuntimeError):
    """Why the certificates could not be written; one line, naming the file."""


def identities(workers: int, names: Iterable[str] = ()) -> list[str]:
    """scheduler, predictor, worker-1..worker-N, then the extra names (no repeats)."""
    out = ["scheduler", "predictor", *(f"worker-{i}" for i in range(1, workers + 1)), *names]
    return list(dict.fromkeys(n for n in out if n))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes through a temporary file, created with ``mode``: a key is never readable by
    others, not even for a moment, and a crash leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _alt_names(identity: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys([identity, "localhost", "127.0.0.1", *hosts]):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _issue(
    identity: str,
    hosts: Sequence[str],
    days: int,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_alt_names(identity, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if not key_path.exists():
        raise CertsError(
            f"{cert_path} exists but {key_path} does not: cannot sign new certificates "
            "(--force makes a new CA)"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise CertsError(f"cannot read the CA in {directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertsError(f"{key_path} is not the EC key of {cert_path}")
    return cert, key


def ca_expired(directory: Path) -> bool:
    """True when DIR holds a CA that is expired or expiring within a day."""
    path = Path(directory) / "ca.pem"
    if not path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return True
    return cert.not_valid_after_utc - RENEW_BEFORE < _now()


def _current(cert_path: Path, key_path: Path, ca_cert: x509.Certificate) -> bool:
    """The identity's files exist, from this CA, and do not expire within a day."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return (
        cert.issuer == ca_cert.subject
        and cert.not_valid_after_utc - RENEW_BEFORE > _now()
        and _signed_by(cert, ca_cert)
    )


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure(
    directory: Path,
    names: Sequence[str],
    *,
    hosts: Sequence[str] = (),
    days: int = 30,
    ca_days: int = 365,
    force: bool = False,
) -> list[Path]:
    """Writes the CA (unless one is there and not ``force``) and each identity that is not
    current; returns the paths written, in order."""
    for name in names:
        if not NAME_RE.fullmatch(name):
            raise CertsError(f"identity {name[:64]!r} must match [A-Za-z0-9._-]{{1,64}}")
    if days < 1 or ca_days < 1:
        raise CertsError("--days and --ca-days must be at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if force or not (directory / "ca.pem").exists():
        ca_cert, ca_key = _new_ca(ca_days)
        _write(directory / "ca.key", _key_pem(ca_key), 0o600)
        _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [directory / "ca.pem", directory / "ca.key"]
    else:
        ca_cert, ca_key = _load_ca(directory)
    for name in names:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        if not force and _current(cert_path, key_path, ca_cert):
            continue
        cert, key = _issue(name, hosts, days, ca_cert, ca_key)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [cert_path, key_path]
    return written


def dev_token(tokens_file: Path, token_file: Path, tenant: str = "dev") -> bool:
    """A tokens file with one random token for ``tenant``, kept as its SHA-256, and the
    token in clear in ``token_file`` (both 0600), unless the tokens file exists.

    Returns whether it wrote them. The token is never printed: clients read the file."""
    if tokens_file.exists():
        return False
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    _write(token_file, token.encode() + b"\n", 0o600)
    _write(
        tokens_file,
        (
            "# Written by `shortline up --tls`: one development token (its SHA-256).\n"
            f'[[token]]\ntenant = "{tenant}"\nsha256 = "{digest}"\n'
        ).encode(),
        0o600,
    )
    return True


def dev_credentials(
    directory: Path, names: Sequence[str], tokens_file: Path, token_file: Path
) -> list[Path]:
    """What ``shortline up --tls`` needs, made where missing: the certificates (all again
    when the CA expires) and the development token. Returns the files written."""
    written = ensure(directory, names, force=ca_expired(directory))
    if dev_token(tokens_file, token_file):
        written += [tokens_file, token_file]
    return written


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "certs",
        help="make a local CA and certificates for TLS and mutual TLS (development)",
        description="Writes DIR/ca.pem, DIR/ca.key and DIR/<name>.pem + .key for scheduler, "
        "predictor, worker-1..N and --names. Keeps an existing CA unless --force.",
    )
    p.add_argument("dir", help="folder to write into (created if missing)")
    p.add_argument("--workers", type=int, default=2, help="worker-1..worker-N (default 2)")
    p.add_argument("--names", default="", help="extra identities, comma-separated")
    p.add_argument(
        "--hosts",
        default="",
        help="extra DNS names or IPs in every certificate, comma-separated "
        "(localhost and 127.0.0.1 are always in)",
    )
    p.add_argument("--days", type=int, default=30, help="certificate validity (default 30)")
    p.add_argument("--ca-days", type=int, default=365, help="CA validity (default 365)")
    p.add_argument(
        "--force", action="store_true", help="make a new CA and issue every certificate again"
    )
    p.set_defaults(func=_main)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _main(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.workers < 0:
        print("shortline certs: --workers must be >= 0", file=sys.stderr)
        return 2
    kept_ca = (directory / "ca.pem").exists() and not args.force
    try:
        written = ensure(
            directory,
            identities(args.workers, _split(args.names)),
            hosts=_split(args.hosts),
            days=args.days,
            ca_days=args.ca_days,
            force=args.force,
        )
    except CertsError as exc:
        print(f"shortline certs: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if kept_ca:
        print(
            f"kept the existing CA {directory / 'ca.pem'} (--force makes a new one)",
            file=sys.stderr,
        )
    if not written:
        print("every certificate is current; nothing written", file=sys.stderr)
    return 0
