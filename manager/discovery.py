"""Finding out what an upstream is: which APIs it speaks and which models it serves, with their details.

Each upstream is asked `GET /v1/models` (OpenAI) and `GET /api/tags` (Ollama; an Ollama server answers both),
plus `GET /api/version` when it speaks Ollama: all free, no inference. A list answered on a path means the
upstream speaks that API (`kinds`). Requests go through manager.outbound (no redirects, 4 MB, one deadline);
each failure is kept as a sentence so the pool's status can say why no models were found.

What an upstream says is input like any other: only routable model names are kept, and of each model's details
only known fields of the expected type, bounded in length (`openai_details`, `ollama_details`), so the gate's
snapshot stays small and nothing hostile reaches a client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from authsvc.model_lists import version_key
from manager import outbound
from manager import validation as v

OPENAI, OLLAMA = "openai", "ollama"
KINDS = (OPENAI, OLLAMA)
LISTS = ((OPENAI, "/v1/models", "data", "id"), (OLLAMA, "/api/tags", "models", "name"))
MAX_TEXT = 100  # characters of any detail string kept
OLLAMA_DETAILS = ("parent_model", "format", "family", "parameter_size", "quantization_level")
VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+-]{0,39}$")

Info = dict[str, dict[str, Any]]  # model name -> its details, per API kind


@dataclass(frozen=True)
class Discovery:
    """What a pool's upstreams report: `models` is None when none of them answered with a list; `error`
    names each upstream that did not (None when all did). `kinds`: the APIs the upstreams that answered speak
    (`pool_kinds`; empty when none answered); `info`: per kind, model -> details (first upstream to name a
    model wins); `version`: the lowest Ollama version reported."""
    models: list[str] | None
    error: str | None
    kinds: tuple[str, ...] = field(default=(), compare=False)
    info: dict[str, Info] = field(default_factory=dict, compare=False)
    version: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Facts:
    """What one upstream reports."""
    kinds: tuple[str, ...]
    models: list[str]
    info: dict[str, Info]
    version: str | None


def text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


def openai_details(entry: dict[str, Any]) -> dict[str, Any]:
    """`created` and `owned_by` of a /v1/models entry, when the upstream gives them."""
    out = {"created": integer(entry.get("created")), "owned_by": text(entry.get("owned_by"))}
    return {k: x for k, x in out.items() if x is not None}


def ollama_details(entry: dict[str, Any]) -> dict[str, Any]:
    """`modified_at`, `size`, `digest` and `details` of an /api/tags (or /api/ps) entry."""
    out: dict[str, Any] = {"modified_at": text(entry.get("modified_at")), "size": integer(entry.get("size")),
                           "digest": text(entry.get("digest"))}
    details = entry.get("details")
    if isinstance(details, dict):
        kept: dict[str, Any] = {k: text(details.get(k)) for k in OLLAMA_DETAILS}
        families = details.get("families")
        if isinstance(families, list):
            kept["families"] = [f[:MAX_TEXT] for f in families[:10] if isinstance(f, str)]
        out["details"] = {k: x for k, x in kept.items() if x is not None}
    return {k: x for k, x in out.items() if x is not None}


DETAILS = {OPENAI: openai_details, OLLAMA: ollama_details}


def upstream_facts(url: str, api_key: str | None = None, verify: bool | str = True) -> Facts:
    """What one upstream speaks and serves; raises outbound.OutboundError saying why it cannot tell."""
    errors: list[outbound.OutboundError] = []
    kinds: list[str] = []
    models: dict[str, None] = {}
    info: dict[str, Info] = {}
    for kind, path, list_field, name_key in LISTS:
        try:
            data = outbound.get_json(url.rstrip("/") + path, api_key=api_key, verify=verify,
                                     max_bytes=outbound.MODEL_LIST_LIMIT)
            entries = [m for m in data[list_field] if isinstance(m, dict)]
            names = [m[name_key] for m in entries]
        except (KeyError, TypeError):
            errors.append(outbound.OutboundError(f"the answer to {path} is not a model list", 200))
        except outbound.OutboundError as e:
            errors.append(e)
            # Only a server that answered, and did not refuse the key, may be an Ollama with /api/tags.
            if e.status is None or e.status in outbound.AUTH_STATUSES:
                break
        else:
            kinds.append(kind)
            # an upstream's answer is input like any other: keep only names Bastion can route safely
            kept = [(n, m) for n, m in zip(names, entries, strict=True)
                    if isinstance(n, str) and v.MODEL_RE.fullmatch(n)]
            models.update(dict.fromkeys(n for n, _ in kept))
            info[kind] = {n: DETAILS[kind](m) for n, m in kept}
    if not kinds:
        raise errors[0]  # the OpenAI list's failure says most (the key, the redirect...)
    return Facts(tuple(kinds), list(models), info, ollama_version(url, api_key, verify) if OLLAMA in kinds else None)


def ollama_version(url: str, api_key: str | None, verify: bool | str) -> str | None:
    """The version an Ollama server reports (None when it does not say)."""
    try:
        version = outbound.get_json(url.rstrip("/") + "/api/version", api_key=api_key, verify=verify,
                                    max_bytes=64 * 1024).get("version")
    except (outbound.OutboundError, AttributeError):
        return None
    return version if isinstance(version, str) and VERSION_RE.fullmatch(version) else None


def upstream_models(url: str, api_key: str | None = None, verify: bool | str = True) -> list[str]:
    """Model names one upstream reports; raises outbound.OutboundError saying why it cannot tell."""
    return upstream_facts(url, api_key, verify).models


def pool_kinds(answered: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The APIs every upstream that answered speaks (nginx may send a request to any of them); upstreams that
    share none (a misconfigured pool) give what any of them speaks, rather than nothing."""
    shared = tuple(k for k in KINDS if answered and all(k in kinds for kinds in answered))
    return shared or tuple(k for k in KINDS if any(k in kinds for kinds in answered))


def discover_pool_models(pool: dict[str, Any], ca_bundle: str | None = None) -> Discovery:
    """Union of what the pool's upstreams report, asked in parallel (so a pool of slow upstreams takes one
    deadline, not one each). Certificates are checked against `ca_bundle` (the same file nginx uses) unless
    the pool turned verification off."""
    verify: bool | str = (ca_bundle or True) if pool.get("tls_verify", True) else False

    def ask(url: str) -> Facts | str:
        try:
            return upstream_facts(url, pool.get("api_key"), verify)
        except outbound.OutboundError as e:
            return f"{url}: {e}"

    answers = outbound.in_parallel(ask, [up["url"] for up in pool["upstreams"]])
    facts = [a for a in answers if isinstance(a, Facts)]
    found = list(dict.fromkeys(name for f in facts for name in f.models)) if facts else None
    info: dict[str, Info] = {}
    for f in facts:
        for kind, models in f.info.items():
            merged = info.setdefault(kind, {})
            for name, details in models.items():
                merged.setdefault(name, details)
    versions = sorted((f.version for f in facts if f.version), key=version_key)
    return Discovery(found, "; ".join(a for a in answers if isinstance(a, str)) or None,
                     kinds=pool_kinds([f.kinds for f in facts]), info=info,
                     version=versions[0] if versions else None)
