"""The routes Bastion knows on the public listener: their methods (405 with `Allow` for the others), the
OpenAI paths also accepted without `/v1`, and the paths a pool's pass-through list may not claim.

One table, read by the gate (methods), the renderer (the alias rewrite nginx applies before the gate sees the
request, so every check and the upstream see the `/v1` form) and the manager (pass-through validation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GET, POST, DELETE = ("GET", "HEAD"), ("POST",), ("DELETE",)  # HEAD goes wherever GET goes (RFC 9110)
# exact path -> methods; other /v1/* and /api/* paths pass through to a pool with any method
METHODS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": POST,
    "/v1/completions": POST,
    "/v1/embeddings": POST,
    "/v1/responses": POST,
    "/v1/moderations": POST,
    "/v1/audio/speech": POST,
    "/v1/audio/transcriptions": POST,
    "/v1/audio/translations": POST,
    "/v1/images/generations": POST,
    "/v1/images/edits": POST,
    "/v1/images/variations": POST,
    "/v1/models": GET,
    "/api/chat": POST,
    "/api/generate": POST,
    "/api/embed": POST,
    "/api/embeddings": POST,
    "/api/show": POST,
    "/api/tags": GET,
    "/api/ps": GET,
    "/api/version": GET,
    "/api/pull": POST,
    "/api/push": POST,
    "/api/create": POST,
    "/api/copy": POST,
    "/api/delete": DELETE,
}
# path prefix -> methods (one segment after it: /v1/models/<id>, the id may hold '/' as in org/model)
PREFIX_METHODS: tuple[tuple[str, tuple[str, ...]], ...] = (("/v1/models/", (*GET, *DELETE)),)

# first segments of OpenAI paths that are also served without /v1 (`openai_paths_without_v1`)
ALIASED = ("chat", "completions", "embeddings", "models", "responses", "moderations", "audio", "images",
           "files", "batches", "uploads", "rerank")
ALIAS_REGEX = "^/(" + "|".join(ALIASED) + ")(/.*)?$"  # nginx rewrites a match to /v1/$1$2
# paths a pool's pass-through list may not claim: Bastion's own, and the /v1-less aliases whether on or not
RESERVED = ("/v1", "/api", "/healthz", "/_bastion", "/.well-known", *(f"/{a}" for a in ALIASED))
PASSTHROUGH_RE = re.compile(r"^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/?\*?$")
MAX_PASSTHROUGH = 50


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods of a route Bastion knows, None for any other path (the upstream decides)."""
    methods = METHODS.get(path)
    if methods is not None:
        return methods
    for prefix, methods in PREFIX_METHODS:
        if path.startswith(prefix) and len(path) > len(prefix):
            return methods
    return None


def wrong_method(path: str, method: str) -> str | None:
    """The `Allow` value when `method` is not one of a known route's, else None."""
    methods = allowed_methods(path)
    if methods is None or method in methods:
        return None
    return ", ".join(methods)


def passthrough_path(path: str) -> str:
    """A pass-through path (exact, or a prefix ending in `*`), returned as given; ValueError saying why not.
    No segment may start with '.' (so no '.' or '..'), and nothing but these characters reaches the snapshot."""
    if not isinstance(path, str):
        raise ValueError("must be a string")
    if not 2 <= len(path) <= 100 or not PASSTHROUGH_RE.fullmatch(path):
        raise ValueError(f"{path[:100]!r} must be a path like /tokenize or /props* (letters, digits and "
                         f". _ ~ - between slashes, an optional * at the end, at most 100 characters)")
    bare = path.rstrip("*").rstrip("/") or "/"
    for reserved in RESERVED:
        # a clash either way: the path is one of Bastion's, or a prefix that would cover one
        if bare == reserved or bare.startswith(reserved + "/") or (path.endswith("*") and reserved.startswith(
                path.rstrip("*"))):
            raise ValueError(f"{path!r} overlaps Bastion's own route {reserved}")
    return path


class PassThrough:
    """Pass-through paths -> the pools that declared them (in pool order); exact paths first, then the longest
    prefix. Built once per snapshot."""

    def __init__(self, pools: Iterable[tuple[str, Iterable[str]]] = ()):
        self.exact: dict[str, tuple[str, ...]] = {}
        prefixes: dict[str, list[str]] = {}
        exact: dict[str, list[str]] = {}
        for pool, paths in pools:
            for path in paths:
                if path.endswith("*"):
                    prefixes.setdefault(path[:-1], []).append(pool)
                else:
                    exact.setdefault(path, []).append(pool)
        self.exact = {p: tuple(names) for p, names in exact.items()}
        self.prefixes = tuple(sorted(((p, tuple(n)) for p, n in prefixes.items()), key=lambda x: -len(x[0])))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def pools(self, path: str) -> tuple[str, ...]:
        """The pools that take this path, empty when none does."""
        found = self.exact.get(path)
        if found:
            return found
        for prefix, pools in self.prefixes:
            if path.startswith(prefix):
                return pools
        return ()
