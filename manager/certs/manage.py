"""The certificate operations the API and the CLI call: obtain, renew, upload, remove, list, deployed, and the
Cloudflare token. Each failure is logged, audited and raised with a message an operator can act on; a failed
operation leaves the certificates as they were (certbot only replaces a lineage after a successful issuance,
an upload only replaces its directory once every check passed).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from manager import validation as v
from manager.certs import checks, pem, preflight
from manager.certs.certbot import Account, Certbot, CertbotFailed
from manager.certs.preflight import AcmeUnavailable
from manager.certs.state import State
from manager.errors import Conflict, NotFound
from manager.nginx import NginxError, local_url

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
RENEW_BEFORE_DAYS = 30  # certbot's own default (renew_before_expiry)
RENEWAL_CHECK_EVERY = 12 * 3600.0  # the scheduled renewal looks twice a day, as Let's Encrypt recommends
AcmeFailed = (CertbotFailed, AcmeUnavailable)  # the ACME side failed: the API answers 502


def _quiet(_: str) -> None:
    pass


def obtain(b: Bastion, domains: Any, challenge: Any, author: str, progress: Progress = _quiet,
           name: Any = None, probe_url: str | None = None) -> dict[str, Any]:
    """Ask the ACME server for a certificate covering `domains`; returns its status. `probe_url` (the HTTP
    listener's base URL) adds the check that the challenge directory is served there."""
    challenge = preflight.challenge(challenge)
    names = checks.domains("domains", domains, wildcard=challenge == "dns-01")
    name = checks.cert_name("name", name) if name else checks.default_name(names)
    if (b.dirs.uploaded_certs / name).exists():
        raise Conflict("name", f"an uploaded certificate is named {name}; remove it first or choose another name")
    settings = b.settings()
    bot = Certbot(b.dirs)
    account = Account(settings["acme_server"], settings["acme_email"], settings["acme_ca_bundle"],
                      settings["acme_key_type"])
    progress(f"checking the {challenge} prerequisites for {', '.join(names)}")
    if challenge == "http-01":
        preflight.http_listener(settings)
        webroot = _webroot(b)
        preflight.webroot_served(webroot, probe_url or local_url(settings["http_listen"]))
        args = bot.webroot_args()
    else:
        preflight.cloudflare_token(b.dirs.cloudflare_credentials)
        args = bot.cloudflare_args(settings["dns_propagation_seconds"])
    secret = _stored_token(b.dirs.cloudflare_credentials)
    progress(f"checking the ACME server {account.server}")
    with bot.lock():
        try:
            preflight.acme_directory(account.server, account.ca_bundle)
            progress(f"requesting the certificate {name} ({challenge})")
            bot.run(bot.certonly(account, name, names, args), account.ca_bundle, progress, secret)
        except AcmeFailed as e:
            _failed(b, author, f"obtain certificate {name} ({challenge})", e)
            raise
    State(b.dirs.cert_state).set(name, source="acme", challenge=challenge, obtained=time.time())
    b.audit.record(author, f"obtain certificate {name} for {', '.join(names)} ({challenge})")
    progress("applying the nginx configuration")
    serve(b, author, f"serve certificate {name}", name)
    status = describe(b, name)
    progress(f"certificate {name} from {status['issuer']}: {status['days_left']} days left")
    return status


def renew(b: Bastion, author: str, name: str | None = None, force: bool = False,
          progress: Progress = _quiet) -> list[dict[str, Any]]:
    """Renew the ACME certificates that are due (all, or `name`; `force`: even if not due). certbot runs the
    deploy hook (`bastion certs deployed`) after each renewal. Returns one result per certificate; failures
    are recorded in its status (last_renewal), logged and audited, never raised for a run over all of them."""
    bot = Certbot(b.dirs)
    if name is not None:
        name = checks.cert_name("name", name)
        if name not in bot.lineages():
            if (b.dirs.uploaded_certs / name).exists():
                raise Conflict("name", f"{name} was uploaded: renew it by uploading its successor")
            raise NotFound("certificate", name)
    results = []
    with bot.lock():
        for lineage in [name] if name else bot.lineages():
            results.append(_renew_one(b, bot, lineage, force, author, progress))
    if name and not results[0]["ok"]:
        raise CertbotFailed(results[0]["message"])
    return results


def scheduled_renewal(b: Bastion, author: str = "scheduler", now: float | None = None) -> list[dict[str, Any]] | None:
    """The renewal `bastion up` runs every minute: at most once per RENEWAL_CHECK_EVERY (across restarts: the
    time of the last check is kept in DATA/certs/renewal-check), renew the ACME certificates that expire
    within RENEW_BEFORE_DAYS. Returns their results, None when it was not time yet. Failures are recorded in
    each certificate's status, logged and audited; only a busy lock (409) is raised (retried a minute later)."""
    now = time.time() if now is None else now
    stamp = b.dirs.certs / "renewal-check"
    try:
        if now - stamp.stat().st_mtime < RENEWAL_CHECK_EVERY:
            return None
    except FileNotFoundError:
        pass
    bot = Certbot(b.dirs)
    due = [n for n in bot.lineages()
           if (s := _summary(b, n, "acme")) is None or s.days_left(now) < RENEW_BEFORE_DAYS]
    results = []
    if due:
        with bot.lock():
            results = [_renew_one(b, bot, n, False, author) for n in due]
    stamp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp.touch()
    os.utime(stamp, (now, now))
    for r in results:
        log.log(logging.INFO if r["ok"] else logging.WARNING, "scheduled renewal of %s: %s", r["name"], r["message"])
    return results


def _renew_one(b: Bastion, bot: Certbot, name: str, force: bool, author: str,
               progress: Progress = _quiet) -> dict[str, Any]:
    before = _summary(b, name, "acme")
    ca_bundle = b.settings()["acme_ca_bundle"]
    try:
        progress(f"asking certbot to renew {name}" + (" (forced)" if force else " if it is due"))
        bot.run(bot.renew(name, force), ca_bundle, progress, secret=_stored_token(b.dirs.cloudflare_credentials))
        after = _summary(b, name, "acme")
        renewed = after is not None and (before is None or after.serial != before.serial)
        expires = time.strftime("%Y-%m-%d", time.gmtime(after.not_after)) if after else "?"
        result = {"ok": True, "message": f"renewed, valid until {expires}" if renewed
                  else f"not due for renewal (valid until {expires})"}
        if renewed:
            b.audit.record(author, f"renew certificate {name}")
            progress("applying the nginx configuration")
            serve(b, author, f"serve renewed certificate {name}", name)  # the deploy hook did, unless it failed
    except CertbotFailed as e:
        result = {"ok": False, "message": str(e)}
        _failed(b, author, f"renew certificate {name}", e)
    except NginxError as e:  # logged and audited by serve
        result = {"ok": False, "message": f"renewed, but nginx refused the new files and serves the previous "
                                          f"ones: {e}"}
    State(b.dirs.cert_state).set(name, last_renewal={"time": time.time(), **result})
    return {"name": name, **result}


def deployed(b: Bastion, lineage: str, author: str = "certbot") -> str:
    """certbot's deploy hook ran for `lineage` (RENEWED_LINEAGE): re-apply the nginx configuration so the new
    files are served (test, reload, verify; rolled back with nginx's words if refused), and record it."""
    name = checks.cert_name("RENEWED_LINEAGE", Path(lineage).name)
    serve(b, author, f"deploy renewed certificate {name}", name)
    State(b.dirs.cert_state).set(name, last_deployed=time.time())
    b.audit.record(author, f"deploy renewed certificate {name}")
    log.info("certificate %s renewed and deployed", name)
    return name


def serve(b: Bastion, author: str, action: str, name: str | None = None) -> None:
    """Re-apply the nginx configuration after a certificate changed (the normal apply: nginx keeps what it
    served when it refuses the new files). Raises NginxError with nginx's words, logged and audited.

    When nginx refuses the files of certificate `name`, they are set aside (not rendered until they change) and
    the configuration is applied again without them: a refused certificate must not block every later change."""
    try:
        b.apply(author)
    except NginxError as e:
        _failed(b, author, action, e)
        paths = files(b, name) if name else None
        if paths:
            with suppress(OSError):
                digest = pem.chain_digest(paths[0].read_bytes())
                State(b.dirs.cert_state).set(name, refused={"digest": digest, "message": e.summary})
                with suppress(NginxError):
                    b.apply(author)
        raise


def refused(b: Bastion) -> dict[str, set[str]]:
    """name → digests of certificate files nginx refused (see `serve`)."""
    return {name: {entry["refused"]["digest"]} for name, entry in State(b.dirs.cert_state).all().items()
            if isinstance(entry.get("refused"), dict) and "digest" in entry["refused"]}


def upload(b: Bastion, certificate: Any, private_key: Any, domains: Any, author: str,
           name: Any = None) -> dict[str, Any]:
    """Check and store an existing certificate chain and key (PEM). Raises ValidationError naming the field."""
    cert_text = v.require_str("certificate", certificate)
    key_text = v.require_str("private_key", private_key)
    names = checks.domains("domains", domains, wildcard=True)
    name = checks.cert_name("name", name) if name else checks.default_name(names)
    if name in Certbot(b.dirs).lineages():
        raise Conflict("name", f"a certificate from the ACME server is named {name}; remove it first or choose "
                               "another name")
    try:
        fullchain, key = pem.check_pair(cert_text, key_text, names)
    except v.ValidationError as e:
        _failed(b, author, f"upload certificate {name}", e)
        raise
    previous = _store_upload(b.dirs.uploaded_certs, name, fullchain, key)
    try:
        serve(b, author, f"serve uploaded certificate {name}")
    except Exception:  # nginx refused it (or the apply could not run): the previous files take their place
        _put_back(b.dirs.uploaded_certs / name, previous)
        raise
    if previous:
        shutil.rmtree(previous.parent)
    State(b.dirs.cert_state).set(name, source="upload", uploaded=time.time(), last_renewal=None)
    b.audit.record(author, f"upload certificate {name} for {', '.join(names)}")
    return describe(b, name)


def remove(b: Bastion, name: Any, author: str) -> None:
    """Stop serving a certificate, then delete its files: the live configuration never names missing files
    (a restarted nginx would not start). Raises NginxError, with nothing removed, when that apply fails."""
    name = checks.cert_name("name", name)
    bot = Certbot(b.dirs)
    acme = name in bot.lineages()
    if not acme and not (b.dirs.uploaded_certs / name).is_dir():
        raise NotFound("certificate", name)
    state = State(b.dirs.cert_state)
    kept = state.get(name)
    paths = files(b, name)
    if paths:  # set aside like a refused certificate, so the apply leaves it out
        with suppress(OSError):
            state.set(name, refused={"digest": pem.chain_digest(paths[0].read_bytes()), "message": "removing"})
    try:
        serve(b, author, f"stop serving certificate {name}")
    except Exception:
        state.update(name, lambda _: kept or None)
        raise
    if acme:
        with bot.lock():
            bot.run(bot.delete(name), None)
    else:
        shutil.rmtree(b.dirs.uploaded_certs / name)
    state.update(name, lambda _: None)
    b.audit.record(author, f"remove certificate {name}")


def set_cloudflare_token(b: Bastion, token: Any, author: str) -> bool:
    """Store the Cloudflare API token (0600; never logged, never shown again); None or "" removes it.
    Returns whether a token is now set."""
    path = b.dirs.cloudflare_credentials
    if token in (None, ""):
        path.unlink(missing_ok=True)
        b.audit.record(author, "remove the Cloudflare API token")
        return False
    token = v.secret("token", token)  # one line of token characters: nothing else can enter the INI file
    _write_private(path, f"dns_cloudflare_api_token = {token}\n".encode())
    b.audit.record(author, "set the Cloudflare API token")
    return True


def _stored_token(path: Path) -> str | None:
    """The stored token, only to cut it out of certbot's output."""
    try:
        return path.read_text().partition("=")[2].strip() or None
    except FileNotFoundError:
        return None


def names(b: Bastion) -> list[tuple[str, str]]:
    """(name, source) of every certificate: ACME ones first, then uploads, each sorted by name."""
    found = [(n, "acme") for n in Certbot(b.dirs).lineages()]
    if b.dirs.uploaded_certs.is_dir():
        found += [(p.name, "upload") for p in sorted(b.dirs.uploaded_certs.iterdir())
                  if p.is_dir() and not p.name.startswith(".")]
    return found


def all_certificates(b: Bastion) -> list[dict[str, Any]]:
    return [describe(b, n, source) for n, source in names(b)]


def files(b: Bastion, name: str) -> tuple[Path, Path] | None:
    """(fullchain, private key) of a certificate, for nginx; None when there is no such certificate."""
    for chain in (b.dirs.certbot_config / "live" / name / "fullchain.pem",
                  b.dirs.uploaded_certs / name / "fullchain.pem"):
        if chain.is_file():
            return chain, chain.with_name("privkey.pem")
    return None


def describe(b: Bastion, name: str, source: str | None = None) -> dict[str, Any]:
    source = source or ("upload" if (b.dirs.uploaded_certs / name).is_dir() else "acme")
    entry = State(b.dirs.cert_state).get(name)
    summary = _summary(b, name, source)
    info: dict[str, Any] = {"name": name, "source": source, "challenge": entry.get("challenge"),
                            "domains": [], "issuer": None, "not_before": None, "not_after": None, "days_left": None,
                            "last_renewal": entry.get("last_renewal"), "last_deployed": entry.get("last_deployed")}
    if summary:
        info.update(domains=summary.names, issuer=summary.issuer, not_before=summary.not_before,
                    not_after=summary.not_after, days_left=summary.days_left())
    return info


def _summary(b: Bastion, name: str, source: str) -> pem.Summary | None:
    base = b.dirs.uploaded_certs if source == "upload" else b.dirs.certbot_config / "live"
    try:
        return pem.read_summary(str(base / name / "cert.pem" if source == "acme" else base / name / "fullchain.pem"))
    except (OSError, ValueError, IndexError) as e:
        log.warning("certificate %s cannot be read: %s", name, e)
        return None


def _failed(b: Bastion, author: str, action: str, error: Exception) -> None:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    log.warning("%s failed: %s", action, str(error).replace("\n", " | "))
    b.audit.record(author, f"{action} failed: {first_line[:300]}")


def _webroot(b: Bastion) -> Path:
    """The HTTP-01 webroot, readable by nginx's workers (challenge answers are public by design)."""
    webroot = b.dirs.acme_webroot
    webroot.mkdir(parents=True, exist_ok=True)
    webroot.chmod(0o755)
    return webroot


def _store_upload(root: Path, name: str, fullchain: bytes, key: bytes) -> Path | None:
    """Write both files into a new dir, then swap it in: a reader never sees a key without its chain. Returns
    where the previous files of `name` were moved (kept until nginx serves the new ones), None if new."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    _write_private(staged / "fullchain.pem", fullchain)
    _write_private(staged / "privkey.pem", key)
    target = root / name
    previous = None
    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=root)) / name
        os.replace(target, previous)
    os.replace(staged, target)
    target.chmod(0o700)
    return previous


def _put_back(target: Path, previous: Path | None) -> None:
    """Undo `_store_upload`: the previous files of the certificate (if any) take their place again."""
    shutil.rmtree(target)
    if previous:
        os.replace(previous, target)
        previous.parent.rmdir()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data)
