"""Client SDK for the Shortline scheduler, for other services.

Sync::

    from shortline.client import ClientOptions, ShortlineClient

    with ShortlineClient(ClientOptions(target="127.0.0.1:50051")) as client:
        stream = client.generate("Name three rivers.", max_tokens=64)
        for text in stream:
            print(text, end="")
        print(stream.result)

asyncio: the same with :class:`AsyncShortlineClient` and ``async for``.
"""

from shortline.client.aio import AsyncGenerateStream, AsyncShortlineClient
from shortline.client.sync import GenerateStream, ShortlineClient
from shortline.client.types import Accepted, ClientOptions, Result

__all__ = [
    "Accepted",
    "AsyncGenerateStream",
    "AsyncShortlineClient",
    "ClientOptions",
    "GenerateStream",
    "Result",
    "ShortlineClient",
]
