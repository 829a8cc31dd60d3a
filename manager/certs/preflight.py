"""Checks before asking an ACME server for anything, each failing with a message an operator can act on.

Nothing here runs certbot: a failed check costs no ACME request (Let's Encrypt rate-limits failures).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from manager import outbound
from manager.errors import Conflict
from manager.validation import ValidationError

PROBE_DEADLINE = 5.0


class AcmeUnavailable(Exception):
    """The ACME server cannot be used (unreachable, not an ACME directory); `str(error)` says why."""


def http_listener(settings: dict[str, Any]) -> None:
    """HTTP-01 needs the HTTP listener: the ACME server fetches http://DOMAIN/.well-known/acme-challenge/..."""
    if not settings.get("http_listen"):
        raise Conflict("http_listen", "is off: HTTP-01 needs the HTTP listener on port 80 of the domain "
                                      "(bastion settings set http_listen 0.0.0.0:80), or use the dns-01 challenge")


def cloudflare_token(credentials: Path) -> None:
    if not credentials.is_file():
        raise Conflict("cloudflare_token", "no Cloudflare API token is set: set one first (bastion certs "
                                           "cloudflare-token, or PUT /api/v1/certificates/cloudflare-token)")


def webroot_served(webroot: Path, base_url: str) -> None:
    """Put a probe file into the webroot and fetch it through `base_url` (e.g. the HTTP listener) the way the
    ACME server will fetch its challenge. Raises Conflict naming http_listen if it is not served."""
    token = f"bastion-probe-{secrets.token_urlsafe(16)}"
    challenge_dir = webroot / ".well-known" / "acme-challenge"
    challenge_dir.mkdir(parents=True, exist_ok=True)
    probe = challenge_dir / token
    probe.write_text(token)
    probe.chmod(0o644)
    url = f"{base_url.rstrip('/')}/.well-known/acme-challenge/{token}"
    try:
        answer = outbound.get(url, deadline=PROBE_DEADLINE, max_bytes=1024)
        if answer.body.strip() != token.encode():
            raise outbound.OutboundError("it answered with something else than the probe file")
    except outbound.OutboundError as e:
        raise Conflict("http_listen", f"{url} does not serve the challenge directory {challenge_dir}: {e}") from None
    finally:
        probe.unlink(missing_ok=True)


def acme_directory(url: str, ca_bundle: str | None) -> None:
    """The ACME server answers its directory (a JSON object naming newOrder), over TLS checked against
    `ca_bundle` (or the system CAs)."""
    try:
        directory = outbound.get_json(url, verify=ca_bundle or True, deadline=10.0)
    except outbound.OutboundError as e:
        raise AcmeUnavailable(f"the ACME server {url} cannot be used: {e}") from None
    if not isinstance(directory, dict) or "newOrder" not in directory:
        raise AcmeUnavailable(f"{url} is not an ACME directory (no newOrder in its answer); check acme_server")


def challenge(value: Any) -> str:
    if value not in ("http-01", "dns-01"):
        raise ValidationError("challenge", "must be http-01 or dns-01")
    return value
