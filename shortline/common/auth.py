"""Bearer tokens: the tokens file, who a presented token belongs to, rotation.

The public API identifies a caller by ``authorization: Bearer <token>``
metadata. A TOML file maps tokens to tenants, and optionally to the models a
tenant may use::

    [[token]]
    tenant = "team-a"                      # [A-Za-z0-9._-]{1,64}
    sha256 = "<hex SHA-256 of the token>"  # or: token = "<the token in clear>"
    models = ["replay"]                    # optional; absent = every model
    max_priority = 2                       # optional; absent = 0 (no request above band 0)
    length_hints = true                    # optional; absent = false (no length_hint)

``max_priority`` caps ``GenerateRequest.priority``: with strict bands one
tenant's priority 2^31-1 would otherwise jump every other tenant's queue, so a
tokens file grants bands explicitly and a request above its tenant's cap is
refused (``PERMISSION_DENIED``). ``length_hints`` lets a tenant send
``GenerateRequest.length_hint``, its own estimate of the output length, which
replaces the predictor's: for the same reason it is granted explicitly. Without a
tokens file (the loopback-only development stack) the one anonymous tenant is
neither capped nor refused hints.

Only SHA-256 digests are held in memory, so a file of digests keeps no token
anywhere on the server. A presented token is hashed and compared with every
entry's digest, with ``hmac.compare_digest`` and no early exit, so the time an
answer takes says neither whether a token is close to a real one nor which
entry it matched. Neither a token nor a digest is ever logged.

Rotation needs no restart: at most once per ``check_interval_s`` an
authentication stats the file, and reloads it when its mtime, size or inode
changed. A reload that fails (half-written file, bad entry) keeps the tokens
in force and logs a warning naming the file and the problem, so a mistake
while rotating never locks every tenant out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from hmac import compare_digest
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_KEYS = frozenset({"tenant", "token", "sha256", "models", "max_priority", "length_hints"})
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
CHECK_INTERVAL_S = 1.0


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Tenant:
    """Who a caller is: a tenant name, the models it may use (None: every model) and the
    highest priority band it may ask for (None: any; only the anonymous tenant)."""

    name: str
    models: frozenset[str] | None = None
    max_priority: int | None = 0
    length_hints: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def may_ask(self, priority: int) -> bool:
        return self.max_priority is None or priority <= self.max_priority


# Without a tokens file every caller is this one tenant.
ANONYMOUS = Tenant("", None, None, length_hints=True)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    tenant: Tenant


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token, as the tokens file's ``sha256`` holds it (in hex)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _entry(path: str, index: int, raw: Any) -> _Entry:
    where = f"tokens file {path!r}: [[token]] entry {index}"
    if not isinstance(raw, dict):
        raise TokensFileError(f"{where} is not a table")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise TokensFileError(
            f"{where}: unknown key(s) {', '.join(unknown)} "
            "(allowed: tenant, token, sha256, models, max_priority, length_hints)"
        )
    name = raw.get("tenant")
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise TokensFileError(f"{where}: tenant must match [A-Za-z0-9._-]{{1,64}}")
    where = f"{where} (tenant {name!r})"
    if ("token" in raw) == ("sha256" in raw):
        raise TokensFileError(f"{where}: give exactly one of token and sha256")
    if "token" in raw:
        # Never echo the value: the message may reach a log.
        token = raw["token"]
        if not isinstance(token, str) or not token or token != token.strip() or " " in token:
            raise TokensFileError(f"{where}: token must be a non-empty string without spaces")
        digest = token_digest(token)
    else:
        hexdigest = raw["sha256"]
        if not isinstance(hexdigest, str) or not _HEX64.fullmatch(hexdigest):
            raise TokensFileError(f"{where}: sha256 must be 64 hex digits")
        digest = bytes.fromhex(hexdigest)
    models: frozenset[str] | None = None
    if "models" in raw:
        listed = raw["models"]
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(m, str) and m for m in listed)
        ):
            raise TokensFileError(
                f"{where}: models must be a non-empty list of model names "
                "(leave it out for every model)"
            )
        models = frozenset(listed)
    cap = raw.get("max_priority", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or not INT32_MIN <= cap <= INT32_MAX:
        raise TokensFileError(f"{where}: max_priority must be a 32-bit integer (absent: 0)")
    hints = raw.get("length_hints", False)
    if not isinstance(hints, bool):
        raise TokensFileError(f"{where}: length_hints must be true or false (absent: false)")
    return _Entry(digest, Tenant(name, models, cap, hints))


def parse_tokens(text: str, path: str) -> tuple[_Entry, ...]:
    """The entries of a tokens file's text; raises TokensFileError naming the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokensFileError(f"tokens file {path!r} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"token"})
    if unknown:
        raise TokensFileError(
            f"tokens file {path!r}: unknown top-level key(s) {', '.join(unknown)} "
            "(expected [[token]] entries)"
        )
    raw = data.get("token")
    if not isinstance(raw, list) or not raw:
        raise TokensFileError(f"tokens file {path!r} has no [[token]] entries")
    entries = tuple(_entry(path, i, r) for i, r in enumerate(raw, start=1))
    first: dict[bytes, int] = {}
    for i, e in enumerate(entries, start=1):
        if e.digest in first:
            raise TokensFileError(
                f"tokens file {path!r}: [[token]] entries {first[e.digest]} and {i} "
                "hold the same token"
            )
        first[e.digest] = i
    return entries


def _signature(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TokenStore:
    """The tokens of one file, re-read when the file changes."""

    def __init__(
        self,
        path: str | Path,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = str(path)
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._signature, self._entries = self._read()  # TokensFileError: refuse to start
        self._checked = clock()

    def _read(self) -> tuple[tuple[int, int, int], tuple[_Entry, ...]]:
        try:
            signature = _signature(self.path)
            text = Path(self.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokensFileError(
                f"cannot read tokens file {self.path!r}: {exc.strerror or exc}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise TokensFileError(f"tokens file {self.path!r} is not UTF-8") from exc
        return signature, parse_tokens(text, self.path)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(e.tenant.name for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def refresh(self) -> bool:
        """Reloads the file if it changed since it was last read; True when it was.

        A file that cannot be used keeps the tokens in force (and is retried when it
        changes again)."""
        self._checked = self._clock()
        try:
            signature = _signature(self.path)
        except OSError as exc:
            log.warning(
                "tokens file %r: cannot stat it (%s); keeping the %d tokens in force",
                self.path,
                exc.strerror or exc,
                len(self._entries),
            )
            return False
        if signature == self._signature:
            return False
        try:
            signature, entries = self._read()
        except TokensFileError as exc:
            self._signature = signature  # not again until it changes again
            log.warning("%s; keeping the %d tokens in force", exc, len(self._entries))
            return False
        self._signature, self._entries = signature, entries
        log.info(
            "tokens file %r reloaded: %d tokens, %d tenants",
            self.path,
            len(entries),
            len(self.tenants),
        )
        return True

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant ``token`` belongs to; None for an unknown token.

        Every entry is compared, whichever matches, in time independent of where
        (or whether) the token matched."""
        if self._clock() - self._checked >= self.check_interval_s:
            self.refresh()
        presented = token_digest(token)
        found: Tenant | None = None
        for entry in self._entries:
            match = compare_digest(entry.digest, presented)
            found = entry.tenant if match else found
        return found


def parse_authorization(value: str) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme in any case);
    None when it is not one."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def authorization_values(metadata: Iterable[tuple[str, Any]] | None) -> list[str]:
    """Every ``authorization`` value of a call's metadata (gRPC lowercases keys)."""
    values = []
    for key, value in metadata or ():
        if key.lower() == "authorization":
            values.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return values


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str | None]:
    """(token, None), or (None, why there is no usable token)."""
    values = authorization_values(metadata)
    if not values:
        return None, "missing bearer token: send metadata 'authorization: Bearer <token>'"
    if len(values) > 1:
        return None, "invalid bearer token: more than one authorization value"
    token = parse_authorization(values[0])
    if token is None:
        return None, "invalid bearer token: authorization must be 'Bearer <token>'"
    return token, None
