"""Admin bearer tokens: only a sha256 of the token is stored; comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_ENV = "ACTIVEGUARD_ADMIN_TOKEN"
MAX_TOKEN_LENGTH = 512


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain sha256 is a sufficient one-way store
    # (no dictionary to attack); a slow KDF would only slow every admin call.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "agt_" + secrets.token_urlsafe(32)


def write_secret(path: Path, text: str) -> None:
    """Write a new file created 0600 (replacing an older one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def create_admin_token(hash_file: Path, token_file: Path | None = None) -> str:
    """Make a new admin token, store its hash in ``hash_file``; the token goes to ``token_file`` (0600).

    Returns the token (the caller must not log it).
    """
    token = new_token()
    write_secret(Path(hash_file), hash_token(token) + "\n")
    if token_file is not None:
        write_secret(Path(token_file), token + "\n")
    return token


def load_token_hash(hash_file: Path) -> str:
    value = Path(hash_file).read_text().strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{hash_file} does not hold a sha256 hex digest")
    return value


class AdminAuth:
    def __init__(self, token_hash: str):
        self._hash = token_hash

    def check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
        """None if authorized, else a message saying what is wrong (never echoing the token)."""
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <admin token>' metadata"
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "authorization metadata must be 'Bearer <admin token>'"
        token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH:
            return "admin token rejected"
        if not hmac.compare_digest(hash_token(token), self._hash):
            return "admin token rejected"
        return None
