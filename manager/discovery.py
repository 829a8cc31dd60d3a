"""Finding out which models an upstream serves: OpenAI `/v1/models`, else Ollama `/api/tags`.

Requests go through manager.outbound (no redirects, 4 MB, one deadline); each failure is kept as a sentence
so the pool's status can say why no models were found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manager import outbound
from manager import validation as v

LISTS = (("/v1/models", "data", "id"), ("/api/tags", "models", "name"))


@dataclass(frozen=True)
class Discovery:
    """What a pool's upstreams report: `models` is None when none of them answered with a list; `error`
    names each upstream that did not (None when all did)."""
    models: list[str] | None
    error: str | None


def upstream_models(url: str, api_key: str | None = None, verify: bool | str = True) -> list[str]:
    """Model names one upstream reports; raises outbound.OutboundError saying why it cannot tell."""
    errors: list[outbound.OutboundError] = []
    for path, field, name_key in LISTS:
        try:
            data = outbound.get_json(url.rstrip("/") + path, api_key=api_key, verify=verify,
                                     max_bytes=outbound.MODEL_LIST_LIMIT)
            names = [m[name_key] for m in data[field]]
        except (KeyError, TypeError):
            error = outbound.OutboundError(f"the answer to {path} is not a model list", 200)
        except outbound.OutboundError as e:
            error = e
        else:
            # an upstream's answer is input like any other: keep only names Bastion can route safely
            return [n for n in names if isinstance(n, str) and v.MODEL_RE.fullmatch(n)]
        errors.append(error)
        # Only a server that answered, and did not refuse the key, may be an Ollama with /api/tags instead.
        if error.status is None or error.status in outbound.AUTH_STATUSES:
            break
    raise errors[0]  # the OpenAI list's failure says most (the key, the redirect...)


def discover_pool_models(pool: dict[str, Any], ca_bundle: str | None = None) -> Discovery:
    """Union of what the pool's upstreams report, asked in parallel (so a pool of slow upstreams takes one
    deadline, not one each). Certificates are checked against `ca_bundle` (the same file nginx uses) unless
    the pool turned verification off."""
    verify: bool | str = (ca_bundle or True) if pool.get("tls_verify", True) else False

    def ask(url: str) -> list[str] | str:
        try:
            return upstream_models(url, pool.get("api_key"), verify)
        except outbound.OutboundError as e:
            return f"{url}: {e}"

    answers = outbound.in_parallel(ask, [up["url"] for up in pool["upstreams"]])
    lists = [a for a in answers if isinstance(a, list)]
    found = list(dict.fromkeys(name for names in lists for name in names)) if lists else None
    return Discovery(found, "; ".join(a for a in answers if isinstance(a, str)) or None)
