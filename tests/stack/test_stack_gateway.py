"""The OpenAI-compatible gateway as one more child of `shortline up`.

The plan (no processes): where the gateway starts and stops, what it is given with
``--tls``, and ``--no-gateway``. Then real stacks on 127.0.0.1 (the replay model:
its text is known exactly) driven by the official ``openai`` client: `shortline up
--tls` at the URL it prints, with the CA and the development token; and a plain
stack whose supervisor restarts a killed gateway.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import openai
import pytest
from processes import assert_nothing_left, descendants, shm_regions
from stacks import stack_config, up_argv, wait_until_serving

from shortline.cli import build_parser
from shortline.common.net import free_port
from shortline.stack import Stack, StackConfig, all_ports, http_ready, plan, port_is_free
from shortline.stack_plan import stop_stages

pytestmark = pytest.mark.slow

PRINTED_URL = re.compile(r"OpenAI API: (\S+)")


def replay_text(n: int) -> str:
    return "".join(f" replay{i}" for i in range(1, n + 1))


def gateway_config(tmp: Path, **overrides: object) -> StackConfig:
    fields: dict[str, object] = dict(
        workers=1,
        slots=2,
        replay_step_a_ms=5.0,
        replay_step_b_ms=1.0,
        triton_models="replay",
        gateway_port=free_port(),
    )
    fields.update(overrides)
    return stack_config(tmp, **fields)


def test_the_plan_puts_the_gateway_after_the_scheduler_and_stops_it_with_it(
    tmp_path: Path,
) -> None:
    cfg = gateway_config(tmp_path)
    children = plan(cfg)
    names = [c.name for c in children]
    assert names.index("gateway") > names.index("scheduler")
    gateway = children[names.index("gateway")]
    args = build_parser().parse_args(gateway.argv[3:])  # the real CLI accepts them
    assert (args.port, args.host) == (cfg.gateway_port, "127.0.0.1")
    assert args.scheduler == f"127.0.0.1:{cfg.scheduler_port}"  # the public port
    assert gateway.health_url == f"http://127.0.0.1:{cfg.gateway_port}/ready"
    assert gateway.ports == (cfg.gateway_port,) and all_ports(cfg)["gateway"] == cfg.gateway_port
    assert float(args.drain_grace_s) == cfg.drain_grace_s  # its streams finish with the drain
    assert gateway.stop_timeout_s > cfg.drain_grace_s
    first = stop_stages(children)[0]
    assert {c.name for c in first} == {"scheduler", "gateway"}

    off = dataclasses.replace(cfg, gateway=False)
    assert "gateway" not in [c.name for c in plan(off)] and "gateway" not in all_ports(off)


def test_with_tls_the_gateway_serves_https_and_verifies_the_scheduler_without_a_token(
    tmp_path: Path,
) -> None:
    cfg = gateway_config(
        tmp_path, tls=True, certs_dir=str(tmp_path / "c"), tokens_file=str(tmp_path / "t.toml")
    )
    gateway = next(c for c in plan(cfg) if c.name == "gateway")
    args = build_parser().parse_args(gateway.argv[3:])
    assert args.tls_cert == str(tmp_path / "c" / "gateway.pem")
    assert args.tls_key == str(tmp_path / "c" / "gateway.key")
    assert args.tls_ca == str(tmp_path / "c" / "ca.pem")
    assert args.token_file is None  # each HTTP client sends its own bearer
    assert gateway.health_url == f"https://127.0.0.1:{cfg.gateway_port}/ready"
    assert cfg.gateway_url() == f"https://127.0.0.1:{cfg.gateway_port}/v1"


def test_up_tls_prints_the_gateway_url_that_the_openai_client_uses(tmp_path: Path) -> None:
    cfg = gateway_config(
        tmp_path,
        tls=True,
        certs_dir=str(tmp_path / "certs"),
        tokens_file=str(tmp_path / "tokens.toml"),
    )
    argv = [
        *up_argv(cfg),
        f"--gateway-port={cfg.gateway_port}",
        "--slots=2",
        "--tls",
        f"--certs-dir={cfg.certs_dir}",
        f"--tokens-file={cfg.tokens_file}",
    ]
    env = {**os.environ, "SHORTLINE_RUN_DIR": str(tmp_path / "run")}
    shm_before = shm_regions()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = wait_until_serving(proc)
        urls = [m.group(1) for line in lines if (m := PRINTED_URL.search(line))]
        assert urls == [f"https://127.0.0.1:{cfg.gateway_port}/v1"], "".join(lines)
        ca = tmp_path / "certs" / "ca.pem"
        token = (tmp_path / "token").read_text().strip()
        http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca)))
        with openai.OpenAI(base_url=urls[0], api_key=token, http_client=http) as client:
            # The worker registers its models just after it reports SERVING.
            deadline = time.monotonic() + 30
            while not (served := {m.id for m in client.models.list()}):
                assert time.monotonic() < deadline, "no model listed"
                time.sleep(0.2)
            assert "replay" in served
            done = client.completions.create(
                model="replay", prompt="go", max_tokens=5, extra_body={"ignore_eos": True}
            )
            assert done.choices[0].text == replay_text(5)
            stream = client.completions.create(
                model="replay",
                prompt="go",
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = list(stream)
            assert "".join(c.choices[0].text for c in chunks if c.choices) == replay_text(7)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
            # The gateway holds no token: without the client's, the scheduler refuses.
            with pytest.raises(openai.AuthenticationError):
                client.with_options(api_key="not-a-token", max_retries=0).completions.create(
                    model="replay", prompt="go", max_tokens=2
                )
        assert not http_ready(f"http://127.0.0.1:{cfg.gateway_port}/ready")  # HTTPS only
        children = descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0
    assert_nothing_left(children, shm_before)
    assert port_is_free("127.0.0.1", cfg.gateway_port)


def test_a_killed_gateway_is_restarted_and_serves_again(tmp_path: Path) -> None:
    said: list[str] = []
    with Stack(gateway_config(tmp_path), say=said.append) as stack:
        assert stack.gateway_url is not None
        with openai.OpenAI(base_url=stack.gateway_url, api_key="none", max_retries=0) as client:
            done = client.completions.create(
                model="replay", prompt="go", max_tokens=3, extra_body={"ignore_eos": True}
            )
            assert done.choices[0].text == replay_text(3)
            gateway = next(c for c in stack.children if c.name == "gateway")
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not any("gateway is SERVING again" in s for s in said):
                assert time.monotonic() < deadline, said
                time.sleep(0.2)
            assert stack.restarts("gateway") == 1
            done = client.completions.create(
                model="replay", prompt="again", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert done.choices[0].text == replay_text(4)
