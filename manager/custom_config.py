"""The admin's custom nginx configuration (`custom_config`) and the masking of secrets in nginx text.

`tokenize` reads nginx syntax the way nginx's own reader does (quotes with escapes, `#` comments only where a
token starts, `${var}`, braces and semicolons), `parse` builds a small tree, and `validate` allows only
`server { ... }` blocks made of the directives in ALLOWED: nginx's master runs as root, so a custom block must
never name a file or a socket, nor reach Bastion's own upstreams, nor take over or reach Bastion's listeners.
`nginx -t` remains the second judge.

`mask` is the one rule for every nginx text shown to people: literal header (and variable) values and URL
credentials become `****`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from manager import validation as v

log = logging.getLogger(__name__)

FIELD = "custom_config"
MAX_SIZE = 64 * 1024
MAX_DEPTH = 8  # server > location > location ... > limit_except


class ConfigSyntaxError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class Token:
    kind: str  # "word", ";", "{" or "}"
    value: str  # a word's text after nginx's unescaping (without its quotes)
    start: int  # where the raw token starts in the text (at its opening quote) ...
    end: int  # ... and ends
    line: int
    quote: str = ""  # '"' or "'" for a quoted word
    broken: bool = False  # an unterminated string (lenient reading only)

    @property
    def inner(self) -> tuple[int, int]:
        """The span of the raw text between the quotes."""
        q = len(self.quote)
        return self.start + q, self.end - (0 if self.broken else q)


@dataclass
class Directive:
    name: Token
    args: list[Token]
    block: list[Directive] | None = None

    @property
    def line(self) -> int:
        return self.name.line

    @property
    def values(self) -> list[str]:
        return [a.value for a in self.args]


# One token at a time, as ngx_conf_read_token does: inside a word `\` escapes the next character, `$` may be
# followed by `{`s, and only whitespace, `;` or `{` end it (`}`, `#` and quotes inside a word are literal).
_TOKEN_RE = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<punct>[;{}])
  | "(?P<dq>(?:[^"\\]|\\[\s\S])*)"
  | '(?P<sq>(?:[^'\\]|\\[\s\S])*)'
  | (?P<word>(?:\\[\s\S]|\$\{*|[^ \t\r\n;{\\$"'#])(?:\\[\s\S]|\$\{*|[^ \t\r\n;{\\$])*)
""", re.VERBOSE)
_UNESCAPE_RE = re.compile(r"""\\(["'\\tnr])""")
_UNESCAPED = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _unescape(raw: str) -> str:
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPED[m[1]], raw) if "\\" in raw else raw


def tokenize(text: str, *, lenient: bool = False) -> Iterator[Token]:
    """nginx's tokens with their positions. Strict reading raises ConfigSyntaxError where nginx would stop (or
    might read differently); lenient reading (for masking) never raises: an unterminated string ends at its
    line's end and marks the token broken."""
    pos, line, n = 0, 1, len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:  # an unterminated string, or a backslash at the very end
            if not lenient:
                what = "string" if text[pos] in "\"'" else "escape"
                raise ConfigSyntaxError(line, f"unterminated {what} (a quote or a trailing backslash)")
            end = text.find("\n", pos)
            end = n if end < 0 else end
            yield Token("word", text[pos + 1:end], pos, end, line, text[pos], broken=True)
            pos = end
            continue
        kind = m.lastgroup
        if kind == "punct":
            yield Token(m[kind], m[kind], pos, m.end(), line)
        elif kind in ("dq", "sq", "word"):
            quote = {"dq": '"', "sq": "'"}.get(kind, "")
            yield Token("word", _unescape(m[kind]), pos, m.end(), line, quote)
            after = text[m.end():m.end() + 1]
            if quote and after and after not in " \t\r\n;{" and not lenient:
                raise ConfigSyntaxError(line, f"unexpected {after!r} right after a quoted string")
        line += m[0].count("\n")
        pos = m.end()


def parse(text: str, visit: Callable[[Directive, str], None] | None = None) -> list[Directive]:
    """The directives of `text` as a tree; raises ConfigSyntaxError for anything nginx would not read as a whole
    sequence of complete statements (an open block or string would swallow Bastion's own configuration).
    `visit(directive, context)` sees each directive as soon as it is complete, before its block's content."""
    root: list[Directive] = []
    stack: list[tuple[list[Directive], str]] = [(root, "top")]
    words: list[Token] = []
    line = 1
    for tok in tokenize(text):
        line = tok.line
        if tok.kind == "word":
            words.append(tok)
            continue
        if tok.kind == "}":
            if words or len(stack) == 1:
                raise ConfigSyntaxError(line, "unexpected '}'")
            stack.pop()
            continue
        if not words:
            raise ConfigSyntaxError(line, f"unexpected {tok.kind!r}")
        directive = Directive(words[0], words[1:], [] if tok.kind == "{" else None)
        words = []
        block, context = stack[-1]
        if visit:
            visit(directive, context)
        block.append(directive)
        if directive.block is not None:
            if len(stack) > MAX_DEPTH:
                raise ConfigSyntaxError(line, f"blocks nested deeper than {MAX_DEPTH} levels")
            stack.append((directive.block, directive.name.value))
    if words or len(stack) > 1:
        raise ConfigSyntaxError(line, "unexpected end: a ';' or '}' is missing")
    return root


# ---- the allow-list ----

Check = Callable[[list[str]], str | None]  # the arguments → why they are refused, or None

_LISTEN_FLAGS = {"default_server", "reuseport", "deferred", "bind", "http2", "proxy_protocol"}
_LISTEN_OPTIONS = {"backlog", "rcvbuf", "sndbuf", "ipv6only", "so_keepalive", "fastopen"}


def _listen(args: list[str]) -> str | None:
    address = args[0]
    host, port = address, "80"
    if address.isdigit():
        host, port = "*", address
    elif re.fullmatch(r"(\*|\[[^\]]*\]|[^:]*):[0-9]{1,5}", address):
        host, _, port = address.rpartition(":")
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        elif host != "*":
            ipaddress.IPv4Address(host)
        if not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        return (f"{address!r} is not an address to listen on: give a port, IPv4:port or [IPv6]:port "
                "(no host names, no unix: sockets)")
    for param in args[1:]:
        name, eq, _ = param.partition("=")
        if not (param in _LISTEN_FLAGS or (eq and name in _LISTEN_OPTIONS)):
            return (f"the parameter {param!r} is not allowed (allowed: {', '.join(sorted(_LISTEN_FLAGS))} and "
                    f"{', '.join(sorted(f'{o}=' for o in _LISTEN_OPTIONS))}; no ssl: certificates are files)")
    return None


_URL_RE = re.compile(r"(?i)(https?)://(\[[0-9a-f:.]+\]|[^/:?#\[\]]+)(?::([0-9]{1,5}))?([/?#].*)?", re.DOTALL)


def _proxy_pass(args: list[str]) -> str | None:
    url = args[0]
    if "$" in url:
        return ("variables are not allowed here: a client could choose where nginx connects (Bastion's admin "
                "listener or any internal service)")
    if "@" in re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]:
        return "credentials in the URL are not supported: send them with proxy_set_header"
    m = _URL_RE.fullmatch(url)
    if not m:
        return f"{url!r} must be an http:// or https:// URL with a host and an optional port (no unix: sockets)"
    host, port = m[2], m[3]
    if port and not 1 <= int(port) <= 65535:
        return "the port must be between 1 and 65535"
    try:
        v.hostname("host", host)
    except v.ValidationError:
        return (f"the host {host!r} must be an IP address or a DNS name (Bastion's own upstream{{}} names, "
                "which reach the gate's and the manager's sockets, cannot be named)")
    return None


def _address(args: list[str]) -> str | None:
    if args[0] == "all":
        return None
    try:
        ipaddress.ip_network(v.no_zone("address", args[0]), strict=False)
    except (ValueError, v.ValidationError):
        return f"{args[0]!r} must be 'all', an IP address or a CIDR"
    return None


def _rewrite(args: list[str]) -> str | None:
    if len(args) == 3 and args[2] not in ("last", "break", "redirect", "permanent"):
        return f"the flag {args[2]!r} must be last, break, redirect or permanent"
    return None


def _error_page(args: list[str]) -> str | None:
    *codes, target = args
    for code in codes:
        if not re.fullmatch(r"[1-5][0-9]{2}|=(?:[1-5][0-9]{2})?", code):
            return f"{code!r} is not a status code (or =code)"
    if not target.startswith(("/", "@", "http://", "https://")):
        return f"the target {target!r} must be a URI, a named location or an http(s) URL"
    return None


def _location(args: list[str]) -> str | None:
    if len(args) == 2 and args[0] not in ("=", "~", "~*", "^~"):
        return f"the modifier {args[0]!r} must be =, ~, ~* or ^~"
    return None


def _one_of(*choices: str) -> Check:
    return lambda args: None if all(a in choices for a in args) else f"the value must be {' or '.join(choices)}"


def _log_off(args: list[str]) -> str | None:
    return None if args == ["off"] else "only 'access_log off': a log path is a file opened by nginx's root master"


@dataclass(frozen=True)
class Rule:
    contexts: frozenset[str]  # "server", "location", "limit_except"
    nargs: tuple[int, int]
    check: Check | None = None
    block: bool = False


SERVER, LOCATION, LIMIT_EXCEPT = frozenset({"server"}), frozenset({"location"}), frozenset({"limit_except"})
BOTH = SERVER | LOCATION
ON_OFF = _one_of("on", "off")


def _rules(contexts: frozenset[str], nargs: tuple[int, int], check: Check | None, *names: str) -> dict[str, Rule]:
    return {name: Rule(contexts, nargs, check) for name in names}


ALLOWED: dict[str, Rule] = {
    "server": Rule(frozenset({"top"}), (0, 0), None, block=True),
    "listen": Rule(SERVER, (1, 12), _listen),
    "location": Rule(BOTH, (1, 2), _location, block=True),
    "limit_except": Rule(LOCATION, (1, 9), None, block=True),
    "allow": Rule(BOTH | LIMIT_EXCEPT, (1, 1), _address),
    "deny": Rule(BOTH | LIMIT_EXCEPT, (1, 1), _address),
    "return": Rule(BOTH, (1, 2), None),  # text bodies may hold any character
    "rewrite": Rule(BOTH, (2, 3), _rewrite),
    "error_page": Rule(BOTH, (2, 24), _error_page),
    "proxy_pass": Rule(LOCATION, (1, 1), _proxy_pass),
    "access_log": Rule(BOTH, (1, 1), _log_off),
    "internal": Rule(LOCATION, (0, 0), None),
    "satisfy": Rule(BOTH, (1, 1), _one_of("all", "any")),
    **_rules(SERVER, (1, 64), None, "server_name"),
    **_rules(SERVER, (1, 1), None, "client_header_timeout", "client_header_buffer_size"),
    **_rules(SERVER, (2, 2), None, "large_client_header_buffers"),
    **_rules(SERVER, (1, 1), ON_OFF, "http2", "ignore_invalid_headers", "underscores_in_headers", "merge_slashes"),
    **_rules(BOTH, (2, 3), None, "proxy_set_header", "add_header", "add_trailer"),
    **_rules(BOTH, (1, 1), None, "proxy_hide_header", "proxy_pass_header", "proxy_http_version",
             "proxy_connect_timeout", "proxy_read_timeout", "proxy_send_timeout", "proxy_next_upstream_timeout",
             "proxy_next_upstream_tries", "proxy_buffer_size", "proxy_busy_buffers_size", "proxy_limit_rate",
             "proxy_max_temp_file_size", "proxy_ssl_name", "proxy_ssl_verify_depth", "proxy_ssl_ciphers",
             "proxy_method", "default_type", "client_max_body_size", "client_body_buffer_size",
             "client_body_timeout", "send_timeout", "keepalive_requests", "limit_rate", "limit_rate_after"),
    **_rules(BOTH, (1, 1), ON_OFF, "proxy_buffering", "proxy_request_buffering", "proxy_intercept_errors",
             "proxy_ssl_server_name", "proxy_ssl_verify", "proxy_ssl_session_reuse", "proxy_pass_request_body",
             "proxy_pass_request_headers", "proxy_socket_keepalive", "log_not_found", "server_tokens",
             "absolute_redirect", "port_in_redirect", "server_name_in_redirect", "chunked_transfer_encoding",
             "recursive_error_pages", "tcp_nodelay", "gzip"),
    **_rules(BOTH, (1, 2), None, "proxy_redirect", "proxy_cookie_domain", "proxy_cookie_path", "keepalive_timeout",
             "expires"),
    **_rules(BOTH, (1, 12), None, "proxy_ignore_headers", "proxy_next_upstream", "proxy_ssl_protocols",
             "proxy_cookie_flags", "gzip_types"),
    **_rules(BOTH, (2, 2), None, "proxy_buffers"),
}

_WHY = {
    "upstream": "an upstream{} may name unix: sockets; proxy_pass to an http(s) URL instead",
    "if": "it can test files; use location, return and rewrite",
    "set": "not needed without if; variables would hide values from the secret masking",
    "resolver": "proxy_pass takes no variables here, so hosts resolve when nginx loads the config",
    "map": "only server blocks are allowed at the top level",
}
_FILE_HINTS = ("include", "root", "alias", "try_files", "index", "autoindex", "load_module", "user", "pid", "env")


def _why_refused(name: str) -> str:
    if name in _WHY:
        return _WHY[name]
    if name.startswith(("ssl_", "proxy_ssl_", "grpc_ssl_", "uwsgi_ssl_")):
        return "TLS needs certificate and key files; Bastion manages TLS itself"
    if (name in _FILE_HINTS or name.startswith(("js_", "perl", "lua", "xslt_"))
            or name.endswith(("_path", "_file", "_log", "_store", "_certificate", "_certificate_key"))
            or "_by_lua" in name):
        return "it reads, writes or runs files or sockets with the privileges of nginx's root master"
    return "it is not on the allow-list, see docs/configuration.md#custom-nginx-configuration"


def _refuse(line: int, message: str) -> v.ValidationError:
    return v.ValidationError(FIELD, f"line {line}: {message}")


def _argument_problem(name: str, rule: Rule, args: list[str]) -> str | None:
    socket = next((a for a in args if "unix:" in a.lower()), None)
    if socket:
        return f"{socket!r} names a unix socket"
    if name != "return" and any(re.search(r"[\x00-\x1f\x7f]", a) for a in args):
        return "arguments must not contain control characters (tab, line breaks...)"
    return rule.check(args) if rule.check else None


def _check(d: Directive, context: str) -> None:
    name = d.name.value
    rule = ALLOWED.get(name)
    if d.name.quote or rule is None:
        why = "directive names must not be quoted" if d.name.quote and rule else _why_refused(name)
        raise _refuse(d.line, f"the directive {name!r} is not allowed in a custom config ({why})")
    if context not in rule.contexts:
        where = "at the top level (only server { ... } blocks)" if context == "top" else f"inside {context}"
        raise _refuse(d.line, f"the directive {name!r} is not allowed {where}")
    if rule.block != (d.block is not None):
        raise _refuse(d.line, f"the directive {name!r} " + ("needs a { } block" if rule.block else
                                                            "takes no { } block"))
    lo, hi = rule.nargs
    if not lo <= len(d.args) <= hi:
        raise _refuse(d.line, f"the directive {name!r} takes {lo}" + (f" to {hi}" if hi > lo else "")
                      + " arguments")
    why = _argument_problem(name, rule, d.values)
    if why:
        raise _refuse(d.line, f"the directive {name!r} is not allowed with these arguments: {why}")


def _port(name: str, args: list[str]) -> int | None:
    """The port a `listen` binds or a `proxy_pass` connects to (both already checked by the allow-list)."""
    if name == "listen":
        address = args[0]
        return int(address if address.isdigit() else address.rpartition(":")[2] or 80)
    m = _URL_RE.fullmatch(args[0])
    return int(m[3]) if m and m[3] else (443 if m and m[1].lower() == "https" else 80)


def _bastion_ports(reserved: Mapping[str, int]) -> Callable[[Directive, str], None]:
    """A check that custom servers keep off Bastion's listeners: they may neither listen on their ports (and
    take over their traffic) nor proxy to the admin listener's (where nginx, a local client, would pass the
    admin network rules: any address of this host may reach it)."""
    def check(d: Directive, context: str) -> None:
        name = d.name.value
        if name not in ("listen", "proxy_pass") or not d.args:
            return
        port = _port(name, d.values)
        for listener, reserved_port in reserved.items():
            if port == reserved_port and (name == "listen" or listener == "admin"):
                raise _refuse(d.line, f"port {port} is the {listener} listener's: custom servers "
                                      + ("listen on ports of their own" if name == "listen" else
                                         "may not proxy to the admin listener"))
    return check


def validate(field_name: str, value: object, reserved: Mapping[str, int] | None = None) -> str:
    """The custom config as stored: size-limited text of `server` blocks made only of allowed directives; with
    `reserved` ({"admin": port, "public": port}) also kept off Bastion's own listeners."""
    text = v.require_str(field_name, value)
    if len(text) > MAX_SIZE:
        raise v.ValidationError(field_name, f"must be at most {MAX_SIZE} characters")
    bad = re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise v.ValidationError(field_name, f"line {line}: control characters other than tab and line breaks "
                                            "are not allowed")
    ports = _bastion_ports(reserved or {})

    def check(d: Directive, context: str) -> None:
        _check(d, context)
        ports(d, context)

    try:
        parse(text, check)
    except ConfigSyntaxError as e:
        raise v.ValidationError(field_name, str(e)) from None
    return text


def listener_ports(settings: Mapping[str, object]) -> dict[str, int]:
    """The ports of Bastion's own listeners, which a custom config must keep off."""
    return {name: int(str(settings[f"{name}_listen"]).rpartition(":")[2])
            for name in ("admin", "public", "http", "https") if settings.get(f"{name}_listen")}


def renderable(text: str, settings: Mapping[str, object]) -> str:
    """The stored custom config if the allow-list accepts it with these settings, else "" (a text stored by an
    older version, restored by a rollback or made wrong by a listener change is never rendered)."""
    try:
        return validate(FIELD, text, listener_ports(settings))
    except v.ValidationError as e:
        log.error("custom_config left out of nginx.conf: %s", e.message)
        return ""


# ---- masking ----

# directive → index of the argument that holds a value nginx sends or stores (headers, params, variables)
_VALUE_ARG = {"proxy_set_header": 1, "grpc_set_header": 1, "add_header": 1, "add_trailer": 1,
              "fastcgi_param": 1, "uwsgi_param": 1, "scgi_param": 1, "set": 1, "proxy_set_body": 0,
              "secure_link_secret": 0, "secure_link_md5": 0}
_HEADER_LINES = {"more_set_headers", "more_set_input_headers"}  # "Name: value" arguments
_VARIABLE_RE = re.compile(r"\$(?:\{\w+\}|\w+)")
_AUTH_SCHEME_RE = re.compile(r"(?i)(bearer|basic|digest|token|bot)\s+\S")
_USERINFO_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@\s]+)@")
_QUERY_VALUE_RE = re.compile(r"[?&][^=&#\s]+=([^&#\s]+)")
MASK = "****"


def _is_secret(value: str) -> bool:
    """Anything but empty text and nginx variables (with separators) may be a secret."""
    return bool(re.search(r"[A-Za-z0-9]", _VARIABLE_RE.sub("", value)))


def _masked(value: str) -> str:
    m = _AUTH_SCHEME_RE.match(value)
    return f"{m[1]} {MASK}" if m else MASK


def _url_secrets(tok: Token, text: str) -> Iterator[tuple[int, int, str]]:
    start, end = tok.inner
    raw = text[start:end]
    found = [m.span(1) for m in _USERINFO_RE.finditer(raw)]
    if "://" in raw or raw.startswith("/"):
        found += [m.span(1) for m in _QUERY_VALUE_RE.finditer(raw) if _is_secret(m[1])]
    for a, b in sorted(found):
        yield start + a, start + b, MASK


def _statement_secrets(words: list[Token], text: str) -> Iterator[tuple[int, int, str]]:
    if not words:
        return
    name = words[0].value.lower()
    value_at = _VALUE_ARG.get(name)
    options_left = 0
    if words[0].broken:
        yield *words[0].inner, MASK
    for i, tok in enumerate(words[1:]):
        start, end = tok.inner
        if tok.broken or (i == value_at and _is_secret(tok.value)):
            yield start, end, _masked(tok.value)
        elif name in _HEADER_LINES and not options_left and not tok.value.startswith("-"):
            colon = text.find(":", start, end)
            if colon >= 0 and _is_secret(tok.value.partition(":")[2]):
                yield colon + 1, end, " " + _masked(tok.value.partition(":")[2].strip())
        else:
            yield from _url_secrets(tok, text)
        options_left = 1 if tok.value in ("-s", "-t") else max(options_left - 1, 0)


def mask(text: str) -> str:
    """nginx text as shown to people: every literal value of a header/param/variable directive (whatever its
    quoting; empty values and bare variables stay) and every URL's user:password@ and query values → ****.
    Works on any text, broken or not (drift: a file edited by hand)."""
    spans: list[tuple[int, int, str]] = []
    words: list[Token] = []
    for tok in tokenize(text, lenient=True):
        if tok.kind == "word":
            words.append(tok)
        else:
            spans += _statement_secrets(words, text)
            words = []
    spans += _statement_secrets(words, text)
    out, pos = [], 0
    for start, end, replacement in spans:
        out += [text[pos:start], replacement]
        pos = end
    out.append(text[pos:])
    return "".join(out)
