"""API keys: created by an admin command, stored as sha256 hashes, looked up per request."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import ApiKey

KEY_PREFIX = "bsk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Session, owner: str) -> str:
    """A new key for `owner`; the plaintext is returned once and never stored."""
    if not owner or len(owner) > 64 or not all(c.isalnum() or c in "-_.@" for c in owner):
        raise ValueError("owner must be 1-64 characters of letters, digits and -_.@")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    db.add(ApiKey(owner=owner, key_hash=hash_key(key), prefix=key[:12]))
    db.flush()
    return key


def owner_of(db: Session, key: str) -> str | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    rec = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False)))
    return None if rec is None else rec.owner
