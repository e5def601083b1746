"""`free_port`: ports picked now and bound later (a slot binds after loading its model) come
from outside the kernel's ephemeral range, where outgoing connections take their local ports."""

from __future__ import annotations

import socket
from pathlib import Path

from deploy.process import free_port


def test_ports_are_bindable_outside_the_ephemeral_range_and_not_handed_out_twice() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    given = [free_port() for _ in range(200)]
    assert not [port for port in given if low <= port <= high]
    assert len(set(given)) == len(given)  # none of the latest answers again, bound or not
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", given[-1]))


def test_a_port_someone_listens_on_is_never_given() -> None:
    listeners = []
    try:
        for _ in range(50):  # hold the next answers; none of them may come back while held
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            listeners.append(sock)
        held = {sock.getsockname()[1] for sock in listeners}
        assert not held & {free_port() for _ in range(300)}
    finally:
        for sock in listeners:
            sock.close()
