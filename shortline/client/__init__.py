"""Client SDK for the Shortline scheduler, for other services.

Sync::

    from shortline.client import ClientOptions, ShortlineClient

    with ShortlineClient(ClientOptions(target="127.0.0.1:50051")) as client:
        stream = client.generate("Name three rivers.", max_tokens=64)
        for text in stream:
            print(text, end="")
        print(stream.result)

asyncio: the same with :class:`AsyncShortlineClient` and ``async for``.

Against a scheduler with TLS and tokens (``shortline up --tls`` writes both)::

    options = ClientOptions.from_files(
        "127.0.0.1:50051", ca_file=".run/certs/ca.pem", token_file=".run/token"
    )

What an overloaded or interrupted scheduler answers:

- ``RESOURCE_EXHAUSTED``: the queue is full, or this tenant holds its share of it
  (``--tenant-queue-share``). Refused at once; the message says why and about when
  to retry, and the trailing metadata ``grpc-retry-pushback-ms`` carries the same
  hint in milliseconds (what gRPC's own retry policies read).
- ``DEADLINE_EXCEEDED`` before any text: the deadline cannot be met given the work
  queued ahead and the predicted length; a longer deadline may pass.
- A stream that breaks frees the request's slot at once, so a retry with the same id
  gets ``ABORTED``; set ``ClientOptions.reattach_grace_seconds`` for the retries to
  continue the same generation instead.
- :class:`StreamDivergedError`: a retried stream was not the same generation (never
  a spliced text); :class:`StreamClosedError`: this client closed the stream.
"""

from shortline.client.aio import AsyncGenerateStream, AsyncShortlineClient
from shortline.client.sync import GenerateStream, ShortlineClient
from shortline.client.types import (
    Accepted,
    ClientConfigError,
    ClientError,
    ClientOptions,
    Result,
    StreamClosedError,
    StreamDivergedError,
)

__all__ = [
    "Accepted",
    "AsyncGenerateStream",
    "AsyncShortlineClient",
    "ClientConfigError",
    "ClientError",
    "ClientOptions",
    "GenerateStream",
    "Result",
    "ShortlineClient",
    "StreamClosedError",
    "StreamDivergedError",
]
