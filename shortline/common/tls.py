"""TLS and mutual TLS for every listener and every channel between services.

One settings block (:class:`TlsSettings`) is part of each service's config, so
``--tls-cert``, ``--tls-key`` and ``--tls-ca`` mean the same everywhere:

- ``tls_cert`` + ``tls_key``: the service's own certificate. Its listeners
  speak TLS, and it presents the certificate when it calls another service.
- ``tls_ca``: the operator's CA. Channels this service opens verify the server
  against it (instead of the system's roots), and *internal* listeners (the
  scheduler's internal port, workers, the predictor) require a client
  certificate from it: mutual TLS. Public listeners (the scheduler's client
  port) never ask clients for a certificate; tokens identify clients there.

A peer's identity is its certificate's common name (``shortline certs`` puts
the same name in the subject alternative names): the scheduler binds a worker
id to it and workers accept jobs only from the scheduler's.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported where used: `shortline --help` and `certs` need none
    import grpc


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable or given without its pair; the message names it."""


@dataclass(frozen=True)
class TlsSettings:
    """The TLS fields every service config has (inherit from it)."""

    tls_cert: str = field(
        default="",
        metadata={"help": "PEM certificate this service presents; turns TLS on for its listeners"},
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = field(
        default="",
        metadata={
            "help": "PEM CA: verifies the services this one calls, and internal listeners "
            "then require client certificates from it (mutual TLS)"
        },
    )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)

    @property
    def mutual_tls(self) -> bool:
        return bool(self.tls_cert and self.tls_ca)


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of a :class:`TlsSettings`, read and checked once at start."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.cert is not None and self.ca is not None

    @property
    def identity(self) -> str | None:
        """This service's name: its certificate's common name (None without TLS)."""
        return None if self.cert is None else common_name(self.cert)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path!r} is not PEM")
    return data


def _check(settings: TlsSettings, cert: bytes, key: bytes, ca: bytes | None) -> None:
    """Fails at start, naming the file, for what would otherwise fail every handshake."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError as exc:
        raise TlsConfigError(
            f"--tls-cert {settings.tls_cert!r} is not a certificate: {exc}"
        ) from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsConfigError(
            f"--tls-key {settings.tls_key!r} is not an unencrypted private key: {exc}"
        ) from exc
    if private.public_key() != certificate.public_key():
        raise TlsConfigError(
            f"--tls-key {settings.tls_key!r} is not the key of --tls-cert {settings.tls_cert!r}"
        )
    now = datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        raise TlsConfigError(
            f"--tls-cert {settings.tls_cert!r} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise TlsConfigError(
                f"--tls-ca {settings.tls_ca!r} holds no certificate: {exc}"
            ) from exc


def load(settings: TlsSettings) -> TlsMaterial:
    """Reads and checks the files; raises TlsConfigError naming what is wrong."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    if settings.tls_ca and not settings.tls_cert:
        raise TlsConfigError(
            "--tls-ca needs --tls-cert and --tls-key too (mutual TLS presents a certificate)"
        )
    if not settings.tls_cert:
        return TlsMaterial()
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    ca = _read(settings.tls_ca, "--tls-ca") if settings.tls_ca else None
    _check(settings, cert, key, ca)
    return TlsMaterial(cert=cert, key=key, ca=ca)


def client_material(ca: str, cert: str = "", key: str = "") -> TlsMaterial:
    """For a tool calling a service (health checks, the launcher): the CA that verifies
    the service and, for a service with mutual TLS, a certificate to present."""
    if bool(cert) != bool(key):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    if cert:
        return load(TlsSettings(tls_cert=cert, tls_key=key, tls_ca=ca))
    return TlsMaterial(ca=_read(ca, "--tls-ca") if ca else None)


def describe(material: TlsMaterial) -> str:
    """For the start-up log: whether and how this service's listeners use TLS."""
    if not material.enabled:
        return "off (plaintext)"
    mode = "mutual TLS on internal listeners" if material.mutual else "no client certificates"
    return f"on, as {material.identity!r}; {mode}"


def common_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate ("" when it has none)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    if not names:
        return ""
    value = names[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_names(text: str) -> frozenset[str]:
    """A comma-separated list of certificate names (blanks dropped)."""
    return frozenset(n.strip() for n in text.split(",") if n.strip())


def server_credentials(material: TlsMaterial, *, internal: bool) -> grpc.ServerCredentials | None:
    """Credentials for a listener; None when TLS is off.

    ``internal`` listeners require a client certificate from the CA when one is
    configured; public ones never do."""
    if material.cert is None or material.key is None:
        return None
    import grpc

    require = internal and material.ca is not None
    return grpc.ssl_server_credentials(
        [(material.key, material.cert)],
        root_certificates=material.ca if require else None,
        require_client_auth=require,
    )


def channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials | None:
    """Credentials for calling another service; None when TLS is off.

    The server is verified against the CA (the system's roots without one); the
    service's own certificate, when there is one, is presented for mutual TLS."""
    if material.cert is None and material.ca is None:
        return None
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert,
    )


def aio_channel(
    target: str,
    material: TlsMaterial,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """A channel to another service: TLS when this service has a certificate."""
    import grpc

    creds = channel_credentials(material)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the caller's verified certificate; None without one."""
    auth = context.auth_context() or {}
    names = list(auth.get("x509_common_name") or [])
    if not names:
        return None
    first = names[0]
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


def caller_allowed(context: grpc.aio.ServicerContext, allowed: Iterable[str]) -> str | None:
    """Why the caller may not call (PERMISSION_DENIED's message); None when it may."""
    identity = peer_identity(context)
    names = sorted(set(allowed))
    if identity is None:
        return f"this call needs a client certificate for one of: {', '.join(names)}"
    if identity not in names:
        return f"certificate {identity[:64]!r} may not call this (allowed: {', '.join(names)})"
    return None


LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine reaches."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
