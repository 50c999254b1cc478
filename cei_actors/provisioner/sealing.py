"""Credentials at rest: sealed with the operator's key (Fernet), masked wherever they are shown.

The log never holds a secret credential value in clear. ``CredentialsSaved`` (version 2)
carries the credentials *masked* (``"****"`` and a short keyed fingerprint per secret value;
the non-secret :data:`PUBLIC_KEYS` in clear) and ``sealed``: a Fernet token of the whole
credentials under the key in the operator's key file, the key's id and a keyed digest (to see
that an update changes nothing without opening the token). The state keeps that entry; only
the cloud worker opens it, just before building a driver. Older logs (version 1 events) hold
clear credentials: they replay into a *legacy* entry (the clear values kept for use, a masked
view for display), and the next save of those credentials seals them.

The key file (``credentials_key_file``, mode 0600, a Fernet key: 32 url-safe base64 bytes) is
read by the Provisioner actor; every host that runs a Provisioner replica needs the same key
(see docs/decisions.md SA2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from ..private_files import SecretFileError, read_secret_file, write_secret_file

__all__ = [
    "PUBLIC_KEYS",
    "CredentialsKey",
    "SealError",
    "entry_from_event",
    "entry_view",
    "mask",
    "open_entry",
    "redact_entry",
    "upgrade_entry",
]

#: Credential fields that are not secret (the EC2 key pair name): kept in clear.
PUBLIC_KEYS = frozenset({"key_name"})
MASK = "****"
_FINGERPRINT_CHARS = 6


class SealError(Exception):
    """Sealed credentials cannot be opened here (no key, another key, a damaged token)."""


def mask(credentials: Mapping[str, Any], fingerprint: Callable[[str], str]) -> dict[str, Any]:
    """``credentials`` with every secret value replaced by ``****`` and its fingerprint."""
    return {k: v if k in PUBLIC_KEYS else f"{MASK}{fingerprint(str(v))}"
            for k, v in credentials.items()}


def _plain_fingerprint(value: str) -> str:
    """The fingerprint of a legacy (clear) entry, which has no key to make it keyed."""
    return hashlib.sha256(value.encode()).hexdigest()[:_FINGERPRINT_CHARS]


class CredentialsKey:
    """The operator's key: seals and opens credentials, fingerprints secret values."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key.strip())
        except (ValueError, TypeError) as exc:
            raise SecretFileError(f"not a credentials key (32 url-safe base64 bytes): {exc}") from None
        raw = base64.urlsafe_b64decode(key.strip())
        self._mac = hmac.new(raw, b"cei credentials fingerprint", hashlib.sha256).digest()
        #: a short public id of the key, recorded with each sealed entry
        self.key_id = hmac.new(raw, b"cei credentials key id", hashlib.sha256).hexdigest()[:12]

    @staticmethod
    def generate() -> bytes:
        return Fernet.generate_key()

    @classmethod
    def load(cls, path: Path | str) -> CredentialsKey:
        """Read a key file (refused unless a regular file that only its owner may read)."""
        data = read_secret_file(path, "credentials key file")
        try:
            return cls(data)
        except SecretFileError as exc:
            raise SecretFileError(f"credentials key file {path}: {exc}") from None

    @classmethod
    def create(cls, path: Path) -> CredentialsKey:
        """Write a new key to ``path`` (mode 0600; never overwrites) and return it."""
        key = cls.generate()
        write_secret_file(Path(path), key + b"\n")
        return cls(key)

    def fingerprint(self, value: str) -> str:
        return hmac.new(self._mac, value.encode(), hashlib.sha256).hexdigest()[:_FINGERPRINT_CHARS]

    def digest(self, credentials: Mapping[str, Any]) -> str:
        text = json.dumps(dict(credentials), sort_keys=True, separators=(",", ":"))
        return hmac.new(self._mac, text.encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, credentials: Mapping[str, Any], now: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(masked view, sealed)``: the two fields of a ``CredentialsSaved`` event."""
        text = json.dumps(dict(credentials), sort_keys=True, separators=(",", ":"))
        token = self._fernet.encrypt_at_time(text.encode(), int(now)).decode()
        sealed = {"token": token, "key_id": self.key_id, "digest": self.digest(credentials)}
        return mask(credentials, self.fingerprint), sealed

    def unseal(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The clear credentials of a sealed entry; :class:`SealError` says why not."""
        if entry.get("key_id") != self.key_id:
            raise SealError(
                f"these credentials were sealed with key {entry.get('key_id')}, this Provisioner "
                f"has key {self.key_id}: every host running a Provisioner needs the same "
                "credentials_key_file"
            )
        try:
            return dict(json.loads(self._fernet.decrypt(entry["token"].encode())))
        except (InvalidToken, KeyError, ValueError, AttributeError) as exc:
            raise SealError(f"sealed credentials cannot be opened: {type(exc).__name__}") from None

    def same(self, entry: Mapping[str, Any], credentials: Mapping[str, Any]) -> bool:
        """Whether ``entry`` already holds exactly ``credentials`` (sealed with this key)."""
        return entry.get("key_id") == self.key_id and entry.get("digest") == self.digest(credentials)


def entry_from_event(credentials: Mapping[str, Any], sealed: Mapping[str, Any] | None) -> dict[str, Any]:
    """The state's entry for a ``CredentialsSaved``: sealed, or legacy (clear) from old logs."""
    if sealed is None:
        return {"view": mask(credentials, _plain_fingerprint), "clear": dict(credentials)}
    return {"view": dict(credentials), **dict(sealed)}


def upgrade_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry from a snapshot: older snapshots hold the clear credentials themselves."""
    if "view" in entry:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
    return entry_from_event(entry, None)


def entry_view(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What callers see of an entry: masked secrets, clear public fields."""
    return dict(entry["view"])


def open_entry(entry: Mapping[str, Any], key: CredentialsKey | None) -> dict[str, Any]:
    """The clear credentials of an entry (for the cloud driver only)."""
    if "clear" in entry:
        return dict(entry["clear"])
    if key is None:
        raise SealError("the credentials are sealed and this Provisioner has no credentials key "
                        "(credentials_key_file)")
    return key.unseal(entry)


def redact_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry as ``cei log state`` shows it: the view and the key id, no token, no clear."""
    out: dict[str, Any] = {"view": dict(entry.get("view", {}))}
    if "key_id" in entry:
        out["key_id"] = entry["key_id"]
    else:
        out["sealed"] = False
    return out
