"""The X-Accel-Redirect gate: nginx hands it each API request (headers and body); it answers either an empty
200 with `X-Accel-Redirect: @pool_<name>` (nginx then replays the request to that pool and streams the
answer) or the error itself, OpenAI-shaped on /v1 and Ollama-shaped on /api.

Everything it needs is in memory (`SnapshotSource`); it does no disk I/O per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from authsvc import aliases, balance, bodies, errors, include_usage, model_lists, quotas, routes
from authsvc import keys as keyformat
from authsvc.anonymous import AnonymousLimiter
from authsvc.bruteforce import LOG_HEADER, BlockBoard, FailureGuard
from authsvc.files import Reloader
from authsvc.ratelimit import RateLimiter
from authsvc.snapshot import KeyRule, Snapshot, SnapshotSource, StatusBoard, model_variants

MODEL_REQUIRED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
    }
)
# endpoints that take multipart/form-data uploads with a `model` field (OpenAI audio and images)
FORM_ENDPOINTS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits",
                            "/v1/images/variations"})
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
JSON_HEADERS = [("Content-Type", "application/json")]
FALLBACK_HEADER = "X-Bastion-Fallback"  # the chain of pools of a request, "a,b,c" (nginx_templates/_fallback.j2)
MAX_CHAIN = 8  # nginx allows 10 internal redirects: the gate's, one per fallback, the last error page
RAW, BODY = "bastion.body", "bastion.json"  # the request body as read and as parsed, kept in the WSGI environ

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
log = logging.getLogger(__name__)


class Reply(Exception):
    """A finished answer from the gate (an error, or a list it serves itself); `reason`: an error's code."""

    def __init__(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = (), reason: str = ""):
        self.status = status
        self.body = body
        self.headers = [*JSON_HEADERS, *headers]
        self.reason = reason


STATUS_TEXT = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
               503: "Service Unavailable"}


def error(status: int, message: str, code: str | None, ollama: bool, param: str | None = None,
          headers: Iterable[tuple[str, str]] = (), kind: str | None = None) -> Reply:
    return Reply(status, errors.body(status, message, code, ollama=ollama, param=param, kind=kind), headers,
                 code or str(status))


class Gate:
    def __init__(self, snapshot_path: Path, pepper: bytes, clock: Callable[[], float] = time.time):
        self.source = SnapshotSource(snapshot_path)
        self.pepper = pepper
        self.limiter = RateLimiter()
        self.clock = clock
        self.guard = FailureGuard(clock)
        self.anonymous = AnonymousLimiter()
        self.quotas = quotas.QuotaFile(snapshot_path.with_name("run") / quotas.QUOTAS_FILE)
        self.quotas.load()
        self.running = model_lists.RunningFile(snapshot_path.with_name("run") / model_lists.RUNNING_FILE)
        self.running.load()
        self.passed: dict[str, tuple[int, int]] = {}  # key -> (UTC day, requests let through), request quotas only
        # decisions by "allow", "answer" (served here), "refuse:<code>", "error:<code>": one increment a request,
        # published by StatusBoard for /metrics (authsvc/server.py runs the gate in one thread)
        self.decisions: Counter[str] = Counter()
        self.turns: dict[tuple[str, ...], int] = {}  # balanced routes: requests started so far, by chain
        self.balancer = balance.Balancer()  # model-aware pools: the upstream each request tries first

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> Gate:
        gate = cls(data_dir / "snapshot.json", (data_dir / "pepper").read_bytes().strip())
        Reloader("quota-figures", gate.quotas.load, quotas.CHECK_INTERVAL).start()
        BlockBoard(gate.guard, data_dir / "run").start()
        Reloader("ollama-running", gate.running.load, model_lists.CHECK_INTERVAL).start()
        StatusBoard(gate.source, data_dir / "run", gate.decisions, gate.status).start()
        return gate

    def status(self) -> dict[str, Any]:
        """For the manager's health check, beside the snapshot's (`StatusBoard`)."""
        return {"quotas_problem": self.quotas.problem or None, "running_problem": self.running.problem or None}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            headers = self.decide(environ)
            self.decisions["allow"] += 1
            start_response("200 OK", headers)
            return [b""]
        except Reply as reply:
            self.decisions[f"refuse:{reply.reason}" if reply.status >= 400 else "answer"] += 1
            start_response(f"{reply.status} {STATUS_TEXT.get(reply.status, 'Error')}", reply.headers)
            return [reply.body]
        except Exception:  # a bug must still answer JSON (the server's own 500 is empty)
            log.exception("gate failed on %s %s (request %s)", environ.get("REQUEST_METHOD"),
                          environ.get("PATH_INFO"), environ.get("HTTP_X_REQUEST_ID", "-"))
            reply = error(500, "The gateway could not handle the request.", "internal_error",
                          str(environ.get("PATH_INFO", "")).startswith("/api/"))
            self.decisions[f"error:{reply.reason}"] += 1
            start_response("500 Internal Server Error", reply.headers)
            return [reply.body]

    def decide(self, environ: dict[str, Any]) -> list[tuple[str, str]]:
        """Return the redirect headers for an allowed request, or raise `Reply`."""
        path: str = environ.get("PATH_INFO") or "/"
        ollama = path.startswith("/api/")
        snap = self.source.refresh()
        address = environ.get("HTTP_X_REAL_IP", "")
        self.refuse_blocked(address, snap, ollama)
        presented = self.identify(environ, snap)
        try:
            if not (ollama or path.startswith("/v1/") or snap.passthrough.pools(path)):
                raise error(404, f"Unknown path {path}", "not_found", ollama)
            if not canonical(path):
                raise error(400, "The path must not contain empty, '.' or '..' segments.", "invalid_path", ollama)
            key = self.authenticate(presented, environ, ollama)
        except Reply:
            # a client without a real key is guessing (or probing paths): that counts; a disabled or expired
            # key proves its secret, so a forgotten client behind a shared address does not block everyone
            if presented is None:
                self.guard.failed(address, snap.bruteforce)
            self.limit_unauthenticated(address, snap, ollama)
            raise
        try:
            headers = self.route(environ, path, snap, key, ollama)
        except Reply as reply:  # nginx logs which key was refused (the header is hidden from the client)
            reply.headers.append(("X-Bastion-Key", key.id))
            raise
        if key.requests_per_day is not None:
            self.count_request(key.id)
        return headers

    def refuse_blocked(self, address: str, snap: Snapshot, ollama: bool) -> None:
        """Checked before anything else: a blocked client learns nothing, not even whether its key is good."""
        block = self.guard.check(address, snap.bruteforce)
        if block is None:
            return
        retry = max(1, math.ceil(block.until - self.clock()))
        headers = [("Retry-After", str(retry))]
        if block.refused > 1:  # one log line per block; blocks.json counts the rest
            headers.append((LOG_HEADER, "0"))
        raise error(429, f"Too many failed authentication attempts from your address; try again in {retry} s.",
                    "too_many_failed_attempts", ollama, headers=headers)

    def limit_unauthenticated(self, address: str, snap: Snapshot, ollama: bool) -> None:
        """Past `unauthenticated_rpm` refusals a minute, an address without a valid key gets a 429 instead."""
        wait, refused = self.anonymous.hit(address, snap.unauthenticated_rpm)
        if wait:
            retry = max(1, math.ceil(wait))
            headers = [("Retry-After", str(retry))]
            if refused > 1:  # one log line per run of refusals; /metrics counts them all
                headers.append((LOG_HEADER, "0"))
            raise error(429, f"Too many requests without a valid API key from your address; try again in {retry} s.",
                        "too_many_unauthenticated_requests", ollama, headers=headers)

    @staticmethod
    def check_method(environ: dict[str, Any], path: str, ollama: bool) -> None:
        """A known route called with another method: 405 with `Allow` (not the upstream's answer, nor a
        misleading 400 for a GET without a body)."""
        method = environ.get("REQUEST_METHOD", "GET")
        allow = routes.wrong_method(path, method)
        if allow is not None:
            raise error(405, f"{method} is not allowed on {path}; use {allow}.", "method_not_allowed", ollama,
                        headers=[("Allow", allow)])

    @staticmethod
    def native_pools(path: str, snap: Snapshot, key: KeyRule, ollama: bool) -> tuple[str, ...]:
        """The pools whose pass-through list takes this path (empty for /v1 and /api). A key reaches them only
        through an endpoint list that names them (docs/decisions.md)."""
        if ollama or path.startswith("/v1/"):
            return ()
        pools = snap.passthrough.pools(path)
        if pools and not key.endpoints:
            raise error(403, f"This API key may not use {path}: pass-through routes need a key whose endpoint "
                        "list names them", "endpoint_not_allowed", ollama)
        return pools

    def route(self, environ: dict[str, Any], path: str, snap: Snapshot, key: KeyRule,
              ollama: bool) -> list[tuple[str, str]]:
        """Checks that need the key, then the pool for the request's model."""
        if not key.allows_endpoint(path):
            raise error(403, f"This API key may not use {path}", "endpoint_not_allowed", ollama)
        self.check_method(environ, path, ollama)
        native = self.native_pools(path, snap, key, ollama)
        limits = self.check_quotas(key, ollama) if key.quotas else []
        if key.rpm:
            decision = self.limiter.hit(key.id, key.rpm)
            if not decision.allowed:
                raise error(429, f"Rate limit of {key.rpm} requests per minute reached for this API key",
                            "rate_limit_exceeded", ollama, headers=decision.headers())
            limits += decision.headers()  # the pool location copies them into the answer
        # nginx passes the client's Upgrade as X-Bastion-Upgrade; a WebSocket handshake is a GET (RFC 6455)
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("HTTP_X_BASTION_UPGRADE", "").lower() == "websocket":
            return self.websocket(environ, snap, key, ollama)
        if environ.get("REQUEST_METHOD") in routes.GET:  # nginx sends no body for HEAD
            self.serve_model_lists(path, snap, key, ollama, limits)
        inserted = False
        try:
            model = self.requested_model(environ, path, ollama, restricted=bool(key.models))
        except Reply as reply:  # a body without a model gets the key's default model, if it has one
            if reply.reason != "missing_model" or not defaultable(environ, key, path, ollama):
                raise
            model, inserted = key.default_model, True
        if path in include_usage.STREAM_ENDPOINTS:
            wrong = include_usage.stream_type_error(environ.get(BODY))
            if wrong:
                raise error(400, wrong, "invalid_type", ollama, param="stream")
        if key.max_parallel:  # nginx counts the key's requests in flight (limit_conn in the pool location)
            limits = [*limits, ("X-Bastion-Parallel", str(key.max_parallel))]
        if model is None:
            pool = native[0] if native else snap.lists.default(ollama, snap.default_pool)
            if pool is None:
                api = "Ollama" if ollama else "OpenAI"
                raise error(503, f"No upstream pool speaks the {api} API" if snap.default_pool
                            else "No upstream pool is configured", "no_pool", ollama)
            return [("X-Accel-Redirect", f"@pool_{pool}"), ("X-Bastion-Key", key.id), *limits]
        asked, chain = model, ()
        if model == aliases.AUTO and key.allow_auto and not inserted and not native:
            model, pool = resolve_auto(snap, key, ollama)
            chain = (pool,)
        if not chain:
            pools, balanced = snap.route_for(model) if key.allows_model(model) else ((), False)
            # a pass-through path goes to the pools that declared it and serve the model, whatever API they
            # speak; otherwise an OpenAI-only pool never gets /api/*, nor falls back to one
            pools = tuple(p for p in pools if p in native) if native else snap.lists.speaking(pools, ollama)
            if not pools:
                raise error(404, f"The model `{model}` does not exist or you do not have access to it.",
                            "model_not_found", ollama, param="model")
            chain = self.chain(pools, balanced)
        # the body is edited for the first pool: a fallback goes only to pools that take the same body
        upstream_name = snap.alias_for(chain[0], model)
        if len(chain) > 1:
            chain = tuple(p for p in chain if snap.alias_for(p, model) == upstream_name)
        headers = [("X-Accel-Redirect", f"@then_{chain[0]}" if len(chain) > 1 else f"@pool_{chain[0]}"),
                   ("X-Bastion-Key", key.id), ("X-Bastion-Model", model), *limits]
        if len(chain) > 1:  # nginx goes on to the next pool when one fails before the first byte (_fallback.j2)
            headers.append((FALLBACK_HEADER, ",".join(chain)))
        choice = aliases.Choice(model, chain[0], upstream_name, inserted)
        edits = self.model_edits(environ, snap, choice, asked, ollama)
        if choice.upstream:  # the answer names the upstream's model: meter.js reports the public one
            headers.append((aliases.PUBLIC_HEADER, model))
        if path in include_usage.ENDPOINTS:  # the same body goes to every pool of the chain: all must take it
            insert = self.usage_insertion(environ, key, snap.usage_pools.issuperset(chain), ollama)
            if insert:
                headers.append((include_usage.HEADER, insert))
                edits += aliases.usage_edit(insert)
        if edits:
            headers.append((aliases.EDIT_HEADER, aliases.edit_header(edits)))
        if snap.balance and chain[0] in snap.balance:  # a model-aware pool: the upstream to try first
            pick = self.balancer.pick(chain[0], snap.balance[chain[0]], model_variants(upstream_name or model),
                                      self.running.loads, self.running.generation)
            if pick is not None:
                headers.append((balance.HEADER, f"{chain[0]}:{pick}"))
        return headers

    def chain(self, pools: tuple[str, ...], balanced: bool) -> tuple[str, ...]:
        """The pools a request tries in order: the route's (at most MAX_CHAIN), or, for a balanced route, the
        same starting at the next pool in turn (one counter per route, in this gate process)."""
        pools = pools[:MAX_CHAIN]
        if not balanced or len(pools) < 2:
            return pools
        if len(self.turns) >= 10_000:  # routes replaced many times over: start the counters again
            self.turns.clear()
        turn = self.turns.get(pools, 0)
        self.turns[pools] = turn + 1
        start = turn % len(pools)
        return pools[start:] + pools[:start]

    def websocket(self, environ: dict[str, Any], snap: Snapshot, key: KeyRule, ollama: bool) -> list[tuple[str, str]]:
        """A WebSocket upgrade (realtime APIs), checked like any request (key, endpoint, rate) before this:
        the model comes from the query string (`?model=`, once), the pool is the first of its route that
        passes WebSockets. A key with a token quota is refused: nothing meters a WebSocket session."""
        if key.token_quota:
            raise error(403, "This API key has a token quota, which WebSocket sessions cannot be metered against.",
                        "websocket_unmetered", ollama)
        query = environ.get("QUERY_STRING", "")
        found = parse_qs(query, keep_blank_values=True).get("model", [])
        if len(found) != 1 or not found[0]:
            raise error(400, "A WebSocket request names its model once in the query string (?model=...).",
                        "missing_model", ollama, param="model")
        model = checked_model(found[0], ollama)
        pools = snap.lists.speaking(snap.pools_for(model), ollama) if key.allows_model(model) else ()
        if not pools:
            raise error(404, f"The model `{model}` does not exist or you do not have access to it.",
                        "model_not_found", ollama, param="model")
        usable = [p for p in pools if p in snap.websocket_pools]
        if not usable:
            raise error(400, f"No pool serving `{model}` accepts WebSocket connections.", "websocket_not_enabled",
                        ollama, param="model")
        pool = usable[0]
        upstream = snap.alias_for(pool, model)
        if upstream is None:
            return [("X-Accel-Redirect", f"@ws_{pool}"), ("X-Bastion-Key", key.id), ("X-Bastion-Model", model)]
        # a model alias: the upstream reads its own name in the query string (nginx's @wsa_ location sets it)
        return [("X-Accel-Redirect", f"@wsa_{pool}"), ("X-Bastion-Key", key.id), ("X-Bastion-Model", model),
                (aliases.ARGS_HEADER, aliases.query_with_model(query, upstream))]

    @staticmethod
    def model_edits(environ: dict[str, Any], snap: Snapshot, choice: aliases.Choice, asked: str,
                    ollama: bool) -> list[tuple[int, int, str]]:
        """The body edit giving the upstream its model name (alias, default model, auto), if one is needed."""
        if not (choice.inserted or choice.upstream or asked != choice.model):
            return []
        if not snap.body_edits:
            raise error(503, f"The model `{choice.model}` needs the request body rewritten, which this gateway "
                        "cannot do now (nginx's njs module is unavailable); ask its operator.",
                        "body_edit_unavailable", ollama, param="model")
        body = environ.get(BODY)
        if not isinstance(body, dict):
            raise error(400, f"The model `{choice.model}` can only be used with a JSON request body.",
                        "model_not_rewritable", ollama, param="model")
        try:
            edit = aliases.model_edit(environ[RAW], body, choice, asked, ollama)
        except ValueError as e:
            raise error(400, f"The request body is ambiguous: {e}.", "ambiguous_body", ollama, param="model") from None
        return [edit] if edit else []

    @staticmethod
    def usage_insertion(environ: dict[str, Any], key: KeyRule, pool_asks: bool, ollama: bool) -> str | None:
        """The X-Bastion-Usage value for a streamed OpenAI request. A key with a token quota must be metered:
        a stream that would carry no usage is refused (400 naming the field) rather than left uncounted."""
        raw, body = environ.get(RAW, b""), environ.get(BODY)
        if not key.token_quota:
            return include_usage.insertion(raw, body) if pool_asks else None
        try:
            return include_usage.metered_insertion(raw, body, pool_asks)
        except include_usage.Unmeterable as e:
            raise error(400, str(e), "usage_required", ollama, param=e.param) from None

    def check_quotas(self, key: KeyRule, ollama: bool) -> list[tuple[str, str]]:
        """Refuse a key whose day or month quota is used up (429 `insufficient_quota`, which clients should not
        retry) or whose sliding minute holds `tpm` tokens (429 `rate_limit_exceeded`, with Retry-After). Returns
        the x-ratelimit-*-tokens headers of a key with a tpm. The figures are the manager's, a few seconds old."""
        now = self.clock()
        used = self.quotas.figures.get(key.id, quotas.NOTHING)
        if key.tokens_per_day is not None and used.tokens_today(now) >= key.tokens_per_day:
            raise exhausted(key.tokens_per_day, "tokens per UTC day", quotas.day_start(now) + quotas.DAY, ollama)
        if key.requests_per_day is not None and self.requests_today(key.id, used, now) >= key.requests_per_day:
            raise exhausted(key.requests_per_day, "requests per UTC day", quotas.day_start(now) + quotas.DAY, ollama)
        if key.tokens_per_month is not None and used.tokens_this_month(now) >= key.tokens_per_month:
            raise exhausted(key.tokens_per_month, "tokens per UTC month", quotas.month_bounds(now)[1], ollama)
        if key.tpm is None:
            return []
        tokens = used.minute_tokens(now)
        headers = [("x-ratelimit-limit-tokens", str(key.tpm)),
                   ("x-ratelimit-remaining-tokens", str(max(0, key.tpm - math.ceil(tokens)))),
                   ("x-ratelimit-reset-tokens", f"{used.minute_reset(now):.3f}s")]
        if tokens >= key.tpm:
            retry = max(1, math.ceil(used.tpm_wait(key.tpm, now)))
            raise error(429, f"Rate limit of {key.tpm} tokens per minute reached for this API key; try again in "
                        f"{retry} s.", "rate_limit_exceeded", ollama, headers=[*headers, ("Retry-After", str(retry))])
        return headers

    def requests_today(self, key_id: str, used: quotas.Consumption, now: float) -> int:
        """Requests the key sent to a pool today: the manager's figure, or the gate's own count when higher (it
        has no lag: the figure comes from the access log, written when a request ends)."""
        mine = self.passed.get(key_id)
        return max(used.requests_today(now), mine[1] if mine and mine[0] == quotas.day_start(now) else 0)

    def count_request(self, key_id: str) -> None:
        """One more request of a key with a request quota let through to a pool. The count starts, each UTC day
        and in each gate process, from the manager's figure: it never counts a request twice."""
        now = self.clock()
        day = quotas.day_start(now)
        mine = self.passed.get(key_id)
        if mine is None or mine[0] != day:
            mine = (day, self.quotas.figures.get(key_id, quotas.NOTHING).requests_today(now))
        self.passed[key_id] = (day, mine[1] + 1)

    def identify(self, environ: dict[str, Any], snap: Snapshot) -> KeyRule | None:
        """The key whose secret the request presents, whatever its state; None for no, unknown or wrong key."""
        auth = environ.get("HTTP_AUTHORIZATION", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else environ.get("HTTP_X_API_KEY", "")
        key_id = keyformat.key_id_of(token)
        key = snap.keys.get(key_id) if key_id else None
        if key is None:
            return None
        # a client sends its key again and again: a plain hash of the secret (4x cheaper than the HMAC) proves a
        # repeat; the KeyRule is rebuilt, so `seen` is empty again, whenever the key's row changes
        seen = hashlib.sha256(token.encode()).digest()
        if key.seen and hmac.compare_digest(seen, key.seen):
            return key
        if not keyformat.matches(self.pepper, token, key.digest):
            return None
        key.seen = seen
        return key

    def authenticate(self, key: KeyRule | None, environ: dict[str, Any], ollama: bool) -> KeyRule:
        """The presented key if it may be used now, from this address; else the 401/403 to answer."""
        if key is None:
            raise error(401, "Incorrect API key provided.", "invalid_api_key", ollama)
        if not key.enabled:
            raise error(401, "This API key is disabled.", "invalid_api_key", ollama)
        if key.expires is not None and self.clock() >= key.expires:
            raise error(401, "This API key has expired.", "invalid_api_key", ollama)
        if not key.allows_address(environ.get("HTTP_X_REAL_IP", "")):
            raise error(403, "This API key may not be used from your address.", "address_not_allowed", ollama)
        return key

    def serve_model_lists(self, path: str, snap: Snapshot, key: KeyRule, ollama: bool,
                          limits: list[tuple[str, str]]) -> None:
        """Answer /v1/models, /v1/models/<id>, /api/tags, /api/ps and /api/version from memory, filtered for
        the key (authsvc/model_lists.py)."""
        lists, allows = snap.lists, key.allows_model if key.models else None
        if path == "/v1/models":
            raise Reply(200, lists.openai.body(allows), limits)
        if path.startswith("/v1/models/"):
            wanted = path[len("/v1/models/"):]
            entry = lists.model(wanted, model_variants, allows)
            if entry is not None:
                raise Reply(200, entry, limits)
            raise error(404, f"The model `{wanted}` does not exist or you do not have access to it.",
                        "model_not_found", ollama, param="model")
        if path == "/api/tags":
            raise Reply(200, lists.tags.body(allows), limits)
        if path == "/api/ps":
            raise Reply(200, self.running.body(lists, allows), limits)
        if path == "/api/version":
            raise Reply(200, lists.version, limits)

    @staticmethod
    def requested_model(environ: dict[str, Any], path: str, ollama: bool, restricted: bool) -> str | None:
        """The model a request names: from a JSON body whatever its Content-Type, from the form of the
        endpoints that take multipart uploads, or the id in DELETE /v1/models/<id>. None when there is none.

        A key with a model allow-list may only send bodies whose model the gate can read the way the
        upstream will (authsvc.bodies): otherwise the upstream might use a model the gate never checked."""
        required = path in MODEL_REQUIRED
        if path.startswith("/v1/models/") and environ.get("REQUEST_METHOD") != "GET":
            return checked_model(path[len("/v1/models/"):], ollama)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            if required:
                raise error(400, "This endpoint needs a JSON body with a `model`.", "missing_model", ollama,
                            param="model")
            return None
        raw = environ["wsgi.input"].read(length)
        environ[RAW] = raw
        content_type = environ.get("CONTENT_TYPE", "")
        try:
            if path in FORM_ENDPOINTS and content_type.lower().startswith("multipart/form-data"):
                found = bodies.form_model(raw, content_type)
            else:
                found, environ[BODY] = bodies.json_document(raw, ollama)
        except ValueError as e:
            if required or restricted:
                raise unreadable(e, required, ollama) from None
            return None  # the key may use any model: the body goes, unread, to the default pool
        if found is None and not (required or restricted):
            return None
        if not isinstance(found, str) or not found:
            raise error(400, "The request body needs a `model` string.", "missing_model", ollama, param="model")
        return checked_model(found, ollama)


def defaultable(environ: dict[str, Any], key: KeyRule, path: str, ollama: bool) -> bool:
    """Whether a request refused for naming no model gets the key's default model instead: an endpoint that
    needs one, a JSON object body with no model key at all (one with `"model": null` would then name two)."""
    body = environ.get(BODY)
    if not key.default_model or path not in MODEL_REQUIRED or not isinstance(body, dict):
        return False
    return not any((k.lower() in ("model", "name")) if ollama else k == "model" for k in body)


def resolve_auto(snap: Snapshot, key: KeyRule, ollama: bool) -> tuple[str, str]:
    """(model, pool) for `"model": "auto"`: the first model of the `auto_models` setting the key may use that
    has a live pool speaking the request's API (one with an upstream the health checks have not marked down),
    and that pool."""
    for model in snap.auto_models:
        if key.allows_model(model):
            for pool in snap.lists.speaking(snap.pools_for(model), ollama):
                if pool in snap.live:
                    return model, pool
    why = "no model is configured for it" if not snap.auto_models else "none of its models has a live upstream"
    raise error(503, f"The model `auto` cannot be served now: {why}.", "no_live_model", ollama, param="model")


def exhausted(limit: int, unit: str, resets: float, ollama: bool) -> Reply:
    """The 429 for a used-up day or month quota: OpenAI's `insufficient_quota`, which its SDKs must not retry."""
    return error(429, f"This API key has used up its quota of {limit} {unit}; it resets at {quotas.iso(resets)}.",
                 "insufficient_quota", ollama, kind="insufficient_quota", headers=[("x-should-retry", "false")])


def unreadable(e: ValueError, required: bool, ollama: bool) -> Reply:
    """The 400 for a body whose model the gate cannot vouch for (authsvc.bodies says why)."""
    if isinstance(e, bodies.TooDeep):
        return error(400, f"The request body is refused: {e}.", "json_too_deep", ollama)
    if isinstance(e, bodies.Ambiguous):
        return error(400, f"The request body is ambiguous: {e}.", "ambiguous_body", ollama, param="model")
    if required:
        return error(400, f"The request body is not valid JSON ({e}).", "invalid_json", ollama)
    return error(400, f"This API key may only send bodies whose model can be checked ({e}).", "unreadable_body",
                 ollama)


def checked_model(model: str, ollama: bool) -> str:
    """A model name that can be routed and logged safely; anything else cannot exist."""
    if not MODEL_RE.fullmatch(model):
        raise error(404, f"The model `{model[:200]}` does not exist or you do not have access to it.",
                    "model_not_found", ollama, param="model")
    return model


def canonical(path: str) -> bool:
    """No empty, '.' or '..' segments: the path the gate checks is the path the upstream acts on."""
    if "//" not in path and "/." not in path:  # the usual path, without splitting it: no such segment possible
        return True
    segments = path.split("/")[1:]
    return not any(s in (".", "..") for s in segments) and "" not in segments[:-1]
