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
"""

from shortline.client.aio import AsyncGenerateStream, AsyncShortlineClient
from shortline.client.sync import GenerateStream, ShortlineClient
from shortline.client.types import Accepted, ClientConfigError, ClientOptions, Result

__all__ = [
    "Accepted",
    "AsyncGenerateStream",
    "AsyncShortlineClient",
    "ClientConfigError",
    "ClientOptions",
    "GenerateStream",
    "Result",
    "ShortlineClient",
]
