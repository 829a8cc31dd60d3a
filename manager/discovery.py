"""Finding out which models an upstream serves: OpenAI `/v1/models`, else Ollama `/api/tags`."""

from __future__ import annotations

from typing import Any

import requests

from manager import validation as v

TIMEOUT = 3.0


def upstream_models(url: str, api_key: str | None = None, verify: bool | str = True) -> list[str] | None:
    """Model names one upstream reports, or None when it cannot be asked."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for path, pick in (("/v1/models", lambda d: [m["id"] for m in d["data"]]),
                       ("/api/tags", lambda d: [m["name"] for m in d["models"]])):
        try:
            resp = requests.get(url.rstrip("/") + path, headers=headers, timeout=TIMEOUT, verify=verify)
            if resp.ok:
                names = pick(resp.json())
                # an upstream's answer is input like any other: keep only names Bastion can route safely
                return [n for n in names if isinstance(n, str) and v.MODEL_RE.fullmatch(n)]
        except (requests.RequestException, OSError, ValueError, KeyError, TypeError):
            continue
    return None


def discover_pool_models(pool: dict[str, Any], ca_bundle: str | None = None) -> list[str] | None:
    """Union of what the pool's upstreams report; None when none of them answered. Certificates are checked
    against `ca_bundle` (the same file nginx uses) unless the pool turned verification off."""
    verify: bool | str = (ca_bundle or True) if pool.get("tls_verify", True) else False
    found: list[str] | None = None
    for up in pool["upstreams"]:
        names = upstream_models(up["url"], pool.get("api_key"), verify)
        if names is not None:
            found = list(dict.fromkeys([*(found or []), *names]))
    return found
