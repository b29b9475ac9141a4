"""Downstream systems' secrets, encrypted at rest with PIPELINE_CONSOLE_SECRET_KEY.

A secret (a bearer token, a password, a header's value, an OAuth2 client secret, a signing
secret, a TLS client key) is written to system_secrets as a Fernet token (AES-128-CBC with
an HMAC-SHA256: `cryptography`'s authenticated recipe), never in a column anyone reads.
What a reader sees instead is `{"secret_set": true, "fingerprint": "…"}`: twelve hex
digits of an HMAC of the value under a key derived from the secret key, so that two
settings can be told apart (was it replaced?) without the fingerprint being a hash anyone
could test guessed passwords against. The fingerprint is computed once, when the secret is
set, and kept through a rotation of the key (a value set again after a rotation gets the
new key's fingerprint: compare fingerprints made under one key).

The key itself: `pipeline-console secrets new-key` prints one; `secrets rotate-key`
re-encrypts every secret from PIPELINE_CONSOLE_SECRET_KEY to PIPELINE_CONSOLE_NEW_SECRET_KEY
(then the new key replaces the old one in every process's environment). A process refuses
to start while the database holds a secret its key cannot read (check_readable)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.models import SystemSecret

KEY_VARIABLE = "PIPELINE_CONSOLE_SECRET_KEY"
NEW_KEY_VARIABLE = "PIPELINE_CONSOLE_NEW_SECRET_KEY"


class KeyProblem(Exception):
    """The secret key is missing, malformed, or cannot read what the database holds."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(key: str, variable: str) -> Fernet:
    try:
        return Fernet(key.strip().encode())
    except (ValueError, TypeError) as error:
        raise KeyProblem(f"{variable} is not a key made by `pipeline-console secrets "
                         f"new-key` (32 bytes, URL-safe base64): {error}") from None


def secret_view(fingerprint: str) -> dict[str, Any]:
    """What every reader sees in a secret's place."""
    return {"secret_set": True, "fingerprint": fingerprint}


@dataclass
class Vault:
    """Encrypts and decrypts with one key; remembers what it decrypted (a worker reads the
    same few secrets for every batch it claims)."""

    key: str | None
    _plain: dict[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"Vault(key_set={self.key is not None})"

    @classmethod
    def from_settings(cls, settings: Any) -> Vault:
        value = getattr(settings, "secret_key", None)
        return cls(None if value is None else value.get_secret_value())

    @property
    def _cipher(self) -> Fernet:
        if self.key is None:
            raise KeyProblem(f"{KEY_VARIABLE} is not set, so secrets can be neither stored "
                             "nor read (make a key with `pipeline-console secrets new-key`)")
        return _fernet(self.key, KEY_VARIABLE)

    def check(self) -> None:
        """KeyProblem, naming the variable, when a key is set but is not a key at all (no
        key is fine: secrets then can be neither stored nor read, which is checked apart)."""
        if self.key is not None:
            _fernet(self.key, KEY_VARIABLE)

    def encrypt(self, value: str) -> str:
        return self._cipher.encrypt(value.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        plain = self._plain.get(ciphertext)
        if plain is None:
            try:
                plain = self._cipher.decrypt(ciphertext.encode()).decode()
            except InvalidToken:
                raise KeyProblem(f"{KEY_VARIABLE} cannot read a secret the database holds "
                                 "(it was stored with another key)") from None
            if len(self._plain) > 10_000:
                self._plain.clear()
            self._plain[ciphertext] = plain
        return plain

    def fingerprint(self, value: str) -> str:
        self._cipher  # noqa: B018 (no key, or a malformed one: KeyProblem)
        assert self.key is not None
        material = hashlib.sha256(b"pipeline-console fingerprint\x00"
                                  + base64.urlsafe_b64decode(self.key.strip())).digest()
        return hmac.new(material, value.encode(), hashlib.sha256).hexdigest()[:12]


def require_key(vault: Vault, field_name: str) -> None:
    """A 422 naming the field when a secret is given to a process that has no key."""
    if vault.key is None:
        raise InvalidInput("secrets cannot be stored: this server has no secret key", [
            FieldError(field_name, f"{KEY_VARIABLE} is not set on the server; an admin "
                                   "makes one with `pipeline-console secrets new-key`",
                       type="no_secret_key")])


async def load_secrets(session: AsyncSession, vault: Vault, systems: Iterable[str], *,
                       now: datetime | None = None) -> dict[str, dict[str, str]]:
    """Per system, its secrets in the clear (slot → value); a signing_previous whose overlap
    is over is left out. KeyProblem if this key cannot read one of them."""
    held, unreadable = await load_readable_secrets(session, vault, systems, now=now)
    if unreadable:
        raise KeyProblem(f"{KEY_VARIABLE} cannot read a secret the database holds (it was "
                         "stored with another key)")
    return held


async def load_readable_secrets(
        session: AsyncSession, vault: Vault, systems: Iterable[str], *,
        now: datetime | None = None,
) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, ...]]]:
    """load_secrets for sends: per system its secrets in the clear, and apart, per system the
    slots this key cannot read (stored with another key: a process still running with the
    old key after `secrets rotate-key`). One unreadable secret stops only its system's
    sends, never the others'."""
    names = sorted(set(systems))
    held: dict[str, dict[str, str]] = {name: {} for name in names}
    unreadable: dict[str, list[str]] = {}
    if not names:
        return held, {}
    rows = (await session.execute(
        select(SystemSecret.system, SystemSecret.slot, SystemSecret.ciphertext,
               SystemSecret.expires_at).where(SystemSecret.system.in_(names)))).all()
    for system, slot, ciphertext, expires_at in rows:
        if expires_at is not None and now is not None and expires_at <= now:
            continue
        try:
            held[system][slot] = vault.decrypt(ciphertext)
        except KeyProblem:
            unreadable.setdefault(system, []).append(slot)
    return held, {system: tuple(sorted(slots)) for system, slots in unreadable.items()}


async def secret_rows(session: AsyncSession, system: str) -> dict[str, SystemSecret]:
    rows = (await session.execute(
        select(SystemSecret).where(SystemSecret.system == system))).scalars()
    return {row.slot: row for row in rows}


async def put_secret(session: AsyncSession, vault: Vault, system: str, slot: str, value: str,
                     *, now: datetime, expires_at: datetime | None = None) -> str:
    """Store (or replace) one secret; returns its fingerprint."""
    fingerprint = vault.fingerprint(value)
    row = await session.get(SystemSecret, (system, slot))
    if row is None:
        row = SystemSecret(system=system, slot=slot)
        session.add(row)
    row.ciphertext, row.fingerprint = vault.encrypt(value), fingerprint
    row.created_at, row.expires_at = now, expires_at
    await session.flush()
    return fingerprint


async def drop_secrets(session: AsyncSession, system: str, slots: Iterable[str]) -> None:
    for slot in slots:
        row = await session.get(SystemSecret, (system, slot))
        if row is not None:
            await session.delete(row)
    await session.flush()


async def check_readable(session: AsyncSession, vault: Vault) -> int:
    """Every stored secret decrypts with this key (KeyProblem otherwise); how many there are."""
    vault.check()  # a malformed key reads nothing: say so, not "stored with another key"
    rows = (await session.execute(select(SystemSecret.system, SystemSecret.slot,
                                         SystemSecret.ciphertext))).all()
    if rows and vault.key is None:
        raise KeyProblem(f"the database holds {len(rows)} secrets of downstream systems but "
                         f"{KEY_VARIABLE} is not set; set it to the key they were stored "
                         "with")
    unreadable = []
    for system, slot, ciphertext in rows:
        try:
            vault.decrypt(ciphertext)
        except KeyProblem:
            unreadable.append(f"{system}.{slot}")
    if unreadable:
        raise KeyProblem(f"{KEY_VARIABLE} cannot read {len(unreadable)} of the {len(rows)} "
                         f"secrets in the database ({', '.join(unreadable[:5])}"
                         f"{', …' if len(unreadable) > 5 else ''}): they were stored with "
                         "another key. Start with the key they were stored with (after "
                         "`secrets rotate-key`, the new one).")
    return len(rows)


async def rotate_key(session: AsyncSession, old: Vault, new: Vault) -> int:
    """Re-encrypt every secret from the old key to the new one, in the caller's transaction
    (all or nothing); fingerprints stay as they are. How many were re-encrypted."""
    rows = list((await session.execute(select(SystemSecret).order_by(
        SystemSecret.system, SystemSecret.slot).with_for_update())).scalars())
    new._cipher  # noqa: B018 (a malformed new key fails before anything changes)
    for row in rows:
        row.ciphertext = new.encrypt(old.decrypt(row.ciphertext))
    await session.flush()
    return len(rows)


def views(rows: Mapping[str, SystemSecret], *, now: datetime) -> dict[str, dict[str, Any]]:
    """slot → what readers see of it (a signing_previous whose overlap is over: nothing, as
    sends no longer use it)."""
    out = {}
    for slot, row in rows.items():
        view = secret_view(row.fingerprint)
        if row.expires_at is not None:
            if row.expires_at <= now:
                continue
            view["expires_at"] = row.expires_at
        out[slot] = view
    return out
