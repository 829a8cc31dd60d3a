"""Reading and checking PEM certificates and keys (with `cryptography`, which certbot depends on).

An uploaded pair is checked before it is stored: the key matches the leaf, the chain is in order (leaf first,
each certificate signed by the next), every certificate is within its validity period, the leaf covers the
requested names. What is stored is re-encoded from the parsed objects, so no stray text reaches nginx.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from manager.certs import checks
from manager.validation import ValidationError

DAY = 86400
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Summary:
    """What the status of a certificate shows."""

    names: list[str]
    issuer: str
    not_before: float
    not_after: float
    serial: str

    def days_left(self, now: float | None = None) -> int:
        return int((self.not_after - (time.time() if now is None else now)) // DAY)


def load_chain(field: str, text: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise ValidationError(field, "holds no readable PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return chain


def load_key(field: str, text: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError:
        raise ValidationError(field, "is encrypted; upload the key without a passphrase") from None
    except ValueError:
        raise ValidationError(field, "is not a readable PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValidationError(field, f"an RSA key needs at least {MIN_RSA_BITS} bits (this one has {key.key_size})")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    raise ValidationError(field, "must be an RSA or ECDSA key (what nginx and every client support)")


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate covers (its subjectAltName)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def covers(names: list[str], domain: str) -> bool:
    """Does a certificate for `names` cover `domain` (a wildcard covers exactly one label)?"""
    if domain in names:
        return True
    head, _, rest = domain.partition(".")
    return bool(rest) and not head.startswith("*") and f"*.{rest}" in names


def served_names(chain_pem: bytes, key_pem: bytes) -> list[str]:
    """The names of a certificate nginx can serve as it is on disk: the chain parses, the key is unencrypted and
    belongs to its first certificate. Raises ValueError saying what is wrong."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted") from None
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise ValueError("the private key does not belong to the certificate")
    names = [n for n in names_of(chain[0]) if _servable_name(n)]  # they go into nginx's server_name
    if not names:
        raise ValueError("the certificate names no DNS name nginx could serve")
    return names


def chain_digest(chain_pem: bytes) -> str:
    """What identifies a certificate's files on disk (rendered into nginx.conf, remembered when nginx refuses
    them); derived from the public chain only."""
    return hashlib.sha256(chain_pem).hexdigest()[:16]


def _servable_name(name: str) -> bool:
    """A certificate's name may be any string; only a plain DNS name (or *.name) ever reaches nginx syntax."""
    try:
        return checks.domain("name", name, wildcard=True) == name.lower()
    except ValidationError:
        return False


def summary(cert: x509.Certificate) -> Summary:
    return Summary(names_of(cert), cert.issuer.rfc4514_string(), cert.not_valid_before_utc.timestamp(),
                   cert.not_valid_after_utc.timestamp(), format(cert.serial_number, "x"))


def read_summary(path: str) -> Summary:
    """The summary of the first certificate in a PEM file. Raises OSError or ValueError."""
    with open(path, "rb") as f:
        return summary(x509.load_pem_x509_certificates(f.read())[0])


def check_pair(cert_text: str, key_text: str, domains: list[str], now: float | None = None) -> tuple[bytes, bytes]:
    """Check an uploaded certificate chain and key; returns (fullchain PEM, key PEM) to store.
    Raises ValidationError naming `certificate` or `private_key`."""
    chain = load_chain("certificate", cert_text)
    key = load_key("private_key", key_text)
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ValidationError("private_key", "does not match the certificate (the first certificate must be the "
                                             "one issued for this key)")
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        if not _signed_by(cert, issuer):
            raise ValidationError("certificate", f"certificate {i + 1} did not sign certificate {i}: give the chain "
                                                 "in order, the server's certificate first, then each issuer")
    now = time.time() if now is None else now
    for i, cert in enumerate(chain, start=1):
        which = "the certificate" if i == 1 else f"certificate {i} of the chain"
        if cert.not_valid_after_utc.timestamp() <= now:
            raise ValidationError("certificate", f"{which} expired on {_date(cert.not_valid_after_utc)}")
        if cert.not_valid_before_utc.timestamp() > now:
            raise ValidationError("certificate", f"{which} is not valid before {_date(cert.not_valid_before_utc)}")
    names = names_of(leaf)
    odd = [n for n in names if not _servable_name(n)]
    if odd:
        raise ValidationError("certificate", f"names {odd[0]!r}, which is not a DNS name Bastion can serve")
    missing = [d for d in domains if not covers(names, d)]
    if missing:
        raise ValidationError("domains", f"the certificate does not cover {', '.join(missing)} "
                                         f"(it covers {', '.join(names) or 'no DNS name'})")
    fullchain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return fullchain, key_pem


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _date(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
