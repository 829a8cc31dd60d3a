"""Configuration from environment variables, as containers are configured: `bastion up` applies these settings
and secrets at every start, so the environment (compose file, `docker run -e`) stays the source of truth.

Secrets come from `NAME` or from the file named by `NAME_FILE` (Docker/compose secrets, mounted under
/run/secrets/); they are never logged and never passed on to the supervised children.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manager import validation as v

if TYPE_CHECKING:
    from manager.context import Bastion

# env var -> setting; a list setting takes a comma-separated value
SETTINGS = {
    "BASTION_SERVER_NAME": "server_name",
    "BASTION_TRUSTED_PROXIES": "trusted_proxies",
    "BASTION_ACME_EMAIL": "acme_email",
    "BASTION_ACME_SERVER": "acme_server",
    "BASTION_HTTPS_PUBLIC_PORT": "https_public_port",
}
LIST_SETTINGS = {"trusted_proxies"}
ADMIN_PASSWORD = "BASTION_ADMIN_PASSWORD"
CLOUDFLARE_TOKEN = "BASTION_CLOUDFLARE_API_TOKEN"
SECRETS = (ADMIN_PASSWORD, CLOUDFLARE_TOKEN)


def secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The secret `name` from the environment or from the file `name`_FILE (one value; a final newline is
    dropped); None when neither is set. Setting both is an error naming them, never a silent choice."""
    env = os.environ if env is None else env
    value, file = env.get(name) or None, env.get(f"{name}_FILE") or None
    if value is not None and file is not None:
        raise v.ValidationError(name, f"set either {name} or {name}_FILE, not both")
    if file is None:
        return value
    try:
        text = Path(file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise v.ValidationError(f"{name}_FILE", f"cannot read {file}: {e.strerror or e}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise v.ValidationError(f"{name}_FILE", f"{file} is empty")
    return text


STOP_TIMEOUT = "BASTION_STOP_TIMEOUT"
DEFAULT_STOP_TIMEOUT = 10


def stop_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds nginx gets at shutdown to finish the streams in flight before it is killed (1-3600, default 10).
    A container sets it below its engine's grace period (docker stop: 10 s), so `up` still exits cleanly."""
    raw = (os.environ if env is None else env).get(STOP_TIMEOUT)
    return v.integer(STOP_TIMEOUT, raw, 1, 3600) if raw else DEFAULT_STOP_TIMEOUT


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the supervised children: without the secrets (they were used at start)."""
    return {k: x for k, x in env.items() if k not in SECRETS}


def settings(bastion: Bastion, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings the environment sets that differ from the stored ones, validated; a bad value is an error
    naming the variable. An empty variable counts as unset."""
    from manager import settings as settings_mod

    env = os.environ if env is None else env
    wanted: dict[str, Any] = {}
    for var, name in SETTINGS.items():
        raw = env.get(var)
        if not raw:  # unset or empty (compose's `${VAR:-}`): the stored setting stays
            continue
        wanted[name] = [x.strip() for x in raw.split(",") if x.strip()] if name in LIST_SETTINGS else raw
    names = {name: var for var, name in SETTINGS.items()}
    try:
        checked = settings_mod.validate(bastion, wanted)
    except v.ValidationError as e:
        setting, _, index = e.field.partition("[")  # trusted_proxies[1] -> BASTION_TRUSTED_PROXIES[1]
        var = names.get(setting)
        raise v.ValidationError(f"{var}{'[' + index if index else ''}" if var else e.field, e.message) from None
    current = bastion.settings()
    return {k: x for k, x in checked.items() if current.get(k) != x}


def apply_cloudflare_token(bastion: Bastion, env: Mapping[str, str] | None = None) -> bool:
    """Store the Cloudflare API token from the environment when it differs from the stored one; returns whether
    it changed. Without the variable the stored token (set through the API or CLI) is left alone."""
    from manager.certs import manage

    token = secret(CLOUDFLARE_TOKEN, env)
    if token is None or token == manage._stored_token(bastion.dirs.cloudflare_credentials):
        return False
    try:
        manage.set_cloudflare_token(bastion, token, "environment")
    except v.ValidationError as e:
        raise v.ValidationError(CLOUDFLARE_TOKEN, e.message) from None
    return True
