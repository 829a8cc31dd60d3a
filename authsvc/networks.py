"""Matching a client address against allow and deny networks: one rule for keys' CIDRs and exempt groups."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def admits(address: str, allow: Sequence[Network], deny: Sequence[Network]) -> bool:
    """A deny network wins; otherwise the address must be in an allow network, if any are given. An address
    that cannot be read is never admitted."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not any(ip in net for net in deny) and (not allow or any(ip in net for net in allow))
