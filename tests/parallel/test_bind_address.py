"""Every listener binds the loopback unless the user names another address (issue 16): the coordinator that
scripts.launch_local's process 0 opens listens on 127.0.0.1 only (before, on every interface: `[::]:PORT`), read
from the kernel's socket table while two processes are joined; and which address is chosen for which
coordinator."""

import io
import ipaddress
import sys
import threading
import time
from pathlib import Path

from parallel.distributed import coordinator_bind_address
from parallel.launch import free_port, launch_local
from tests.subprocesses import HANG_LIMIT_S


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and /proc/net/tcp6 (each
    32-bit word of an address is written in host byte order: little-endian here)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A = LISTEN
                continue
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            found.append(ipaddress.ip_address(raw))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how gRPC binds 127.0.0.1 on a v6 socket
    return (mapped or address).is_loopback


def test_launch_local_coordinator_listens_on_the_loopback_only(tmp_path):
    port, stop, output = free_port(), tmp_path / "stop", io.StringIO()
    child = ("import pathlib, time\n"
             "from parallel.distributed import initialize, resolve_distributed\n"
             "initialize(resolve_distributed())\n"
             "import jax\n"
             "print('joined', jax.process_index(), flush=True)\n"
             f"while not pathlib.Path({str(stop)!r}).exists():\n"
             "    time.sleep(0.05)\n")
    codes = []
    launcher = threading.Thread(target=lambda: codes.append(launch_local(
        [sys.executable, "-c", child], 2, cpu_devices=1, port=port, sink=output, timeout=HANG_LIMIT_S - 60)))
    launcher.start()
    try:
        deadline = time.monotonic() + HANG_LIMIT_S - 60
        while output.getvalue().count("joined") < 2 and launcher.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert output.getvalue().count("joined") == 2, output.getvalue()
        addresses = listening_addresses(port)
    finally:
        stop.touch()
        launcher.join()
    assert codes == [0], output.getvalue()
    assert addresses and all(is_loopback(a) for a in addresses), addresses


def test_bind_address_follows_the_coordinator():
    assert coordinator_bind_address("localhost:1234", env={}) == "127.0.0.1:1234"
    assert coordinator_bind_address("127.0.0.1:99", env={}) == "127.0.0.1:99"
    assert coordinator_bind_address("[::1]:99", env={}) == "[::1]:99"
    assert coordinator_bind_address("head-node:1234", env={}) is None  # other hosts must reach it: JAX's default
    assert coordinator_bind_address("10.0.0.5:1234", env={}) is None
    assert coordinator_bind_address("localhost:1234", env={"JAX_COORDINATOR_BIND_ADDRESS": "0.0.0.0:1234"}) == \
        "0.0.0.0:1234"
