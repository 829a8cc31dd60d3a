"""Admin self-lockout guard: a change that would make the admin listener deny the address of the admin who
asked for it is refused (409) unless the request says `force`.

The API layer names the requester for the duration of a request (`requester`, set in manager/app.py);
`Bastion.change(..., nginx=True)` asks `LockoutGuard.check()` after the change is staged and before nginx sees it.
So every path is covered in one place: llm-proxy's write-default, settings (`admin_cidr_groups`, and
`trusted_proxies`, which changes the address nginx sees), CIDR group edits and config rollbacks.
CLI changes carry no address and are never refused.
"""

from __future__ import annotations

import ipaddress
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from manager.apply import access_rules
from manager.errors import Conflict

if TYPE_CHECKING:
    from manager.context import Bastion

Rules = list[tuple[str, str]]


@dataclass(frozen=True)
class Requester:
    peer: str  # the address that connected to nginx, before any X-Forwarded-For processing
    forwarded_for: str  # the X-Forwarded-For header as the client sent it
    force: bool


requester: ContextVar[Requester | None] = ContextVar("requester", default=None)


def force() -> None:
    """The current request says `force` (a JSON body field; the query parameter is read with the requester)."""
    if (who := requester.get()) is not None:
        requester.set(replace(who, force=True))


class SelfLockout(Conflict):
    def __init__(self, why: str):
        super().__init__("force", f"this change would {why} or repeat the request with force=true")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped  # nginx matches mapped addresses as IPv4
    return ip


def seen_address(peer: str, forwarded_for: str, trusted_proxies: list[str]) -> str:
    """The client address nginx derives with these trusted proxies (`real_ip_header X-Forwarded-For;
    real_ip_recursive on`): the rightmost untrusted hop, walking left from a trusted peer."""
    trusted = [ipaddress.ip_network(c) for c in trusted_proxies]

    def is_trusted(text: str) -> bool:
        ip = _ip(text)
        return ip is not None and any(ip in net for net in trusted)

    if not is_trusted(peer):
        return peer
    address = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if _ip(hop) is None:
            return peer  # nginx ignores a header it cannot parse
        address = hop
        if not is_trusted(hop):
            break
    return address


def permits(rules: Rules, address: str) -> bool:
    """nginx's allow/deny: the first matching rule decides; no match allows."""
    ip = _ip(address)
    if ip is None:
        return True  # not an IP (a unix socket): nginx's rules do not apply to it either
    for action, target in rules:
        if target == "all" or ip in ipaddress.ip_network(target):
            return action == "allow"
    return True


class LockoutGuard:
    """Notes whether the admin listener admits the requester before a change; `check()` refuses the change when
    it would not admit them afterwards."""

    def __init__(self, bastion: Bastion):
        who = requester.get()
        self.who = None if who is None or who.force else who
        self.admitted_before = self.who is not None and self._refusal(bastion) is None

    def _refusal(self, bastion: Bastion) -> str | None:
        """Why the admin listener would shut the requester out with the stored settings (None: it would not)."""
        assert self.who is not None
        settings = bastion.settings()
        address = seen_address(self.who.peer, self.who.forwarded_for, settings["trusted_proxies"])
        if not permits(access_rules(bastion, settings["admin_cidr_groups"]), address):
            return f"deny your address {address} on the admin listener; include it in the allowed networks"
        listen = settings["admin_listen"]
        peer = _ip(self.who.peer)
        if ipaddress.ip_address(listen.rpartition(":")[0].strip("[]")).is_loopback and peer and not peer.is_loopback:
            return (f"move the admin listener to {listen}, which your address {peer} cannot reach; keep an address "
                    "you can reach")
        return None

    def check(self, bastion: Bastion) -> None:
        if self.admitted_before and (why := self._refusal(bastion)):
            raise SelfLockout(why)
