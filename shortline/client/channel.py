"""Channel and metadata construction shared by the sync and asyncio clients."""

from __future__ import annotations

import grpc

from shortline.client.types import ClientOptions

_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 30_000)]


def _credentials(options: ClientOptions) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=options.root_certificates)


def sync_channel(options: ClientOptions) -> grpc.Channel:
    if options.tls:
        return grpc.secure_channel(options.target, _credentials(options), _CHANNEL_OPTIONS)
    return grpc.insecure_channel(options.target, _CHANNEL_OPTIONS)


def aio_channel(options: ClientOptions) -> grpc.aio.Channel:
    if options.tls:
        return grpc.aio.secure_channel(options.target, _credentials(options), _CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(options.target, _CHANNEL_OPTIONS)


def call_metadata(options: ClientOptions) -> tuple[tuple[str, str], ...]:
    if options.token:
        return (("authorization", f"Bearer {options.token}"),)
    return ()


def is_retryable(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    return bool(code == grpc.StatusCode.UNAVAILABLE)
