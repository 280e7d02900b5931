"""One SDK client per bearer token, kept while in use and a while after.

The SDK sends its token on every call from the client's options, so callers
with different tokens need different clients. A client per HTTP request would
open a connection (and a TLS handshake) to the scheduler per request; one per
token, kept in a small LRU, costs a connection per tenant. A client is closed
only once no request uses it (closing it cancels its open streams), and one
whose token the scheduler refused is dropped at once, so random tokens cannot
crowd out the tenants' clients for long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator

import anyio
import grpc

from shortline.client import AsyncShortlineClient, ClientOptions


@dataclasses.dataclass
class _Entry:
    client: AsyncShortlineClient
    users: int = 0


class ClientPool:
    def __init__(self, base: ClientOptions, max_clients: int) -> None:
        self.base = base
        self.max_clients = max_clients
        # Keyed by the token's digest: the table never holds a token as a key.
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # Out of the table, closed once their last request ends.
        self._retired: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def client(self, token: str | None) -> AsyncIterator[AsyncShortlineClient]:
        """A client sending ``token`` (the gateway's own when None), for one request."""
        key = hashlib.sha256(token.encode()).digest() if token is not None else b""
        entry = self._entries.get(key)
        if entry is None:
            options = self.base if token is None else dataclasses.replace(self.base, token=token)
            entry = _Entry(AsyncShortlineClient(options))
            self._entries[key] = entry
        self._entries.move_to_end(key)
        entry.users += 1
        try:
            yield entry.client
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._drop(key, entry)
            raise
        finally:
            entry.users -= 1
            # Shielded: a request cancelled because its client left still closes
            # what it retired (anyio cancels every await of a cancelled scope).
            with anyio.CancelScope(shield=True):
                await self._close_idle()

    def _drop(self, key: bytes, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
            self._retired.append(entry)

    async def _close_idle(self) -> None:
        """Retires the least recently used idle clients above the limit, then closes
        every retired client no request uses any more."""
        for key, entry in list(self._entries.items()):
            if len(self._entries) <= self.max_clients:
                break
            if entry.users == 0:
                self._drop(key, entry)
        idle = [e for e in self._retired if e.users == 0]
        self._retired = [e for e in self._retired if e.users > 0]
        for entry in idle:
            await entry.client.close()

    async def close(self) -> None:
        entries = list(self._entries.values()) + self._retired
        self._entries, self._retired = OrderedDict(), []
        for entry in entries:
            await entry.client.close()
