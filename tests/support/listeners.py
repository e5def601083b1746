"""Where sockets listen on this machine, read from /proc/net (what `ss -ltn` shows)."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def listen_addresses(port: int) -> set[str]:
    """The addresses TCP sockets listen on at `port` ("0.0.0.0" or "::" = every interface)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                # the kernel prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                ip = ipaddress.ip_address(raw)
                # an IPv6 socket bound to ::ffff:127.0.0.1 (gRPC does that) listens on 127.0.0.1
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return found
