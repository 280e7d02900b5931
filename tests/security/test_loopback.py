"""`shortline up` holds only loopback listeners: every TCP socket in LISTEN state that
the launcher's process tree holds (scheduler, predictor, worker, the Triton launcher
and ``tritonserver`` itself, metrics endpoints included) is bound to 127.0.0.1 or ::1.

Sockets are read from the kernel, not from configuration: each process's
``/proc/<pid>/fd`` links name socket inodes, and ``/proc/<pid>/net/tcp{,6}`` map
inodes to local addresses and states.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import descendants
from stacks import stack_config, up_argv, wait_until_serving

from shortline.stack import all_ports

pytestmark = pytest.mark.slow

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid}) on {self.address}:{self.port}"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _listening_inodes(pid: int) -> dict[int, tuple[str, int]]:
    """inode -> (address hex, port) of the sockets in LISTEN state in ``pid``'s namespace."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == TCP_LISTEN:
                address, port = local.split(":")
                found[inode] = (address, int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listeners(pids: list[int]) -> list[Listener]:
    out = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue
        listening = _listening_inodes(pid)
        for inode in _socket_inodes(pid) & listening.keys():
            address, port = listening[inode]
            out.append(Listener(pid, command, _address(address), port))
    return out


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def test_the_address_parser_reads_proc_net_tcp() -> None:
    """The kernel's hex form of the addresses the assertion below compares."""
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("00000000") == ipaddress.ip_address("0.0.0.0")
    assert _address("00000000000000000000000001000000") == ipaddress.ip_address("::1")
    assert not is_loopback(_address("00000000"))
    assert not is_loopback(_address("00000000000000000000000000000000"))  # ::
    assert is_loopback(_address("0000000000000000FFFF00000100007F"))  # ::ffff:127.0.0.1


def test_shortline_up_holds_only_loopback_listeners(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path, workers=1, triton_models="replay")
    argv = up_argv(cfg)
    # The defaults are under test, not whatever an environment variable asks for.
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SHORTLINE_") and "HOST" in k)}
    env["SHORTLINE_RUN_DIR"] = str(tmp_path / "run")  # its outcome log, not the repo's
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        wait_until_serving(proc)
        tree = [proc.pid, *descendants(proc.pid)]
        held = listeners(tree)
        commands = {entry.command for entry in held}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    report = "\n".join(sorted(str(entry) for entry in held))
    assert held, "no listening socket found in the stack's processes"
    ports = {entry.port for entry in held}
    # Every service's listener was seen, tritonserver's own among them; the
    # scheduler's public and internal ports by name, since they matter most.
    assert {cfg.scheduler_port, cfg.scheduler_internal_port} <= ports, report
    missing = {name: p for name, p in all_ports(cfg).items() if p not in ports}
    assert not missing, f"listeners not found for {missing}:\n{report}"
    assert "tritonserver" in commands, report
    exposed = [str(entry) for entry in held if not is_loopback(entry.address)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
