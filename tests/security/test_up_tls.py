"""`shortline up --tls` end to end: every service a real process with TLS and mutual
TLS, the SDK streaming an answer with the development token from the token file."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import grpc
import pytest
from stacks import stack_config

from shortline.client import ClientOptions, ShortlineClient
from shortline.common import tls
from shortline.stack import LAUNCHER, Stack, StackConfig, grpc_serving

pytestmark = pytest.mark.slow

LENGTH_MODEL = "Meta-Llama-3-8B-Instruct"


def tls_stack_config(tmp: Path) -> StackConfig:
    return stack_config(
        tmp,
        workers=1,
        slots=2,
        replay_step_a_ms=5.0,
        replay_step_b_ms=1.0,
        triton_models="replay",
        # A cold predictor on a busy CI machine must not make this a fallback.
        extra_scheduler_args=f"--predictor-timeout-ms 10000 --outcome-log {tmp / 'o.sqlite'}",
        tls=True,
        certs_dir=str(tmp / "certs"),
        tokens_file=str(tmp / "tokens.toml"),
    )


def test_up_tls_streams_an_answer_with_the_token(tmp_path: Path) -> None:
    cfg = tls_stack_config(tmp_path)
    started = time.monotonic()
    with Stack(cfg) as stack:
        token_file = tmp_path / "token"
        assert cfg.token_path() == token_file
        for private in (token_file, tmp_path / "tokens.toml", tmp_path / "certs" / "ca.key"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in (tmp_path / "tokens.toml").read_text()
        for child in stack.children:  # each service presents its own certificate
            if child.name != "triton":
                assert str(tmp_path / "certs" / f"{child.name}.pem") in child.argv, child.name

        options = ClientOptions.from_files(
            stack.scheduler_address,
            ca_file=tmp_path / "certs" / "ca.pem",
            token_file=token_file,
            timeout_seconds=60,
        )
        with ShortlineClient(options) as client:
            stream = client.generate(
                "Name a river.",
                model="replay",
                max_tokens=10,
                ignore_eos=True,
                length_model=LENGTH_MODEL,
            )
            text = "".join(stream)
        assert text == "".join(f" replay{i}" for i in range(1, 11))
        result = stream.result
        assert result is not None and result.worker_id == "worker-1"
        # The scheduler reached the predictor over mutual TLS (not the fallback).
        assert result.prediction_source == "predictor"
        assert stack.client_options().token == token

        # The same call without the token, or in plaintext, is refused.
        anonymous = ClientOptions.from_files(
            stack.scheduler_address, ca_file=tmp_path / "certs" / "ca.pem", timeout_seconds=10
        )
        plain = ClientOptions(target=stack.scheduler_address, token=token, timeout_seconds=10)
        for opts, code in (
            (anonymous, grpc.StatusCode.UNAUTHENTICATED),
            (plain, grpc.StatusCode.UNAVAILABLE),
        ):
            with ShortlineClient(opts) as client, pytest.raises(grpc.RpcError) as err:
                client.stats()
            assert err.value.code() == code

        # Internal listeners want a certificate from the CA: the launcher's works, none fails.
        certs = tmp_path / "certs"
        launcher = tls.client_material(
            str(certs / "ca.pem"), str(certs / f"{LAUNCHER}.pem"), str(certs / f"{LAUNCHER}.key")
        )
        ca_only = tls.client_material(str(certs / "ca.pem"))
        for port in (cfg.predictor_port, cfg.worker_base_port, cfg.scheduler_internal_port):
            address = f"127.0.0.1:{port}"
            assert grpc_serving(address, timeout=5, material=launcher), address
            assert not grpc_serving(address, timeout=5, material=ca_only), address
    assert time.monotonic() - started < 90
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert token not in logs
