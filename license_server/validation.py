"""Request validation on plain values: bounded, printable text and sane numbers, before any store or model.

Pure functions (no store, no model, no gRPC), so the fuzz tests can drive them through the
servicer cheaply; each failure is an :class:`~license_server.errors.InvalidRequest`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from activeguard.credentials.fingerprints import ENCODINGS
from activeguard.models.inputs import InputSpec, SourceError
from license_server.errors import InvalidRequest

MAX_VALIDITY = 20 * 365 * 24 * 3600
MAX_NAME = 256
MAX_ID = 128  # model ids are 64 hex digits, license ids 32; longer can only be garbage
MAX_REASON = 1024
MAX_PATH = 4096
MAX_MODEL_FILE = 1024 * 1024  # characters of an eager model's Python source
MAX_SPEC = 4096  # characters of an input spec's JSON
MAX_PAGE = 1000
MAX_SEQUENCE = 2**63 - 1  # sequence numbers (page tokens, revocation cursors) are signed 64-bit in every store

_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII digits only, no sign, no leading zeros: str(int) of a seq


def shown(value: Any, limit: int = 80) -> str:
    """``repr`` of a client-supplied value, cut short: a refusal must never echo megabytes (gRPC caps
    status details at a few kB, and a longer message turns a clean refusal into a transport error)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_text(field: str, value: str, *, limit: int, required: bool = False) -> None:
    """Client text the server stores, matches or echoes: bounded, printable, not blank.

    Control characters (NUL above all) are refused here because PostgreSQL rejects them in TEXT
    columns; blank values because they can never name anything.
    """
    if not value:
        if required:
            raise InvalidRequest(f"{field} must not be empty")
        return
    if len(value) > limit:
        raise InvalidRequest(f"{field} is {len(value)} characters; at most {limit} are allowed")
    if not value.isprintable():
        raise InvalidRequest(f"{field} must be printable (no control characters)")
    if not value.strip():
        raise InvalidRequest(f"{field} must not be blank")


def check_reason(reason: str) -> None:
    """A revocation reason: free text that may span lines, but no other control characters."""
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason is {len(reason)} characters; at most {MAX_REASON} are allowed")
    if not reason.replace("\n", " ").replace("\t", " ").isprintable():
        raise InvalidRequest("reason must be printable (newlines and tabs are fine, other control characters are not)")


def check_validity(seconds: int, default: int) -> int:
    """The license lifetime in seconds; 0 means the server default."""
    if seconds < 0:
        raise InvalidRequest(f"validity_seconds must be positive, got {seconds}")
    validity = seconds or default
    if validity > MAX_VALIDITY:
        raise InvalidRequest(f"validity_seconds may be at most {MAX_VALIDITY} (20 years), got {validity}")
    return validity


def parse_page_token(token: str) -> int:
    """The sequence number after which a page starts; only tokens this server hands out are valid."""
    if not token:
        return 0
    if len(token) > len(str(MAX_SEQUENCE)) or not _DECIMAL.fullmatch(token) or int(token) > MAX_SEQUENCE:
        raise InvalidRequest(
            f"page_token {shown(token)} is not one this server returned: pass next_page_token "
            "back unchanged, or leave it empty for the first page"
        )
    return int(token)


def check_list(page_size: int, page_token: str, model_id: str, user: str) -> tuple[int, int]:
    """(page size, sequence to start after) of a valid license listing."""
    if page_size > MAX_PAGE:
        raise InvalidRequest(f"page_size may be at most {MAX_PAGE}, got {page_size}")
    check_text("model_id", model_id, limit=MAX_ID)
    check_text("user", user, limit=MAX_NAME)
    return page_size or 100, parse_page_token(page_token)


def check_issue(user: str, model_id: str, validity_seconds: int, default_validity: int) -> int:
    """The validity in seconds of a valid issuance (the model is looked up afterwards)."""
    check_text("user", user, limit=MAX_NAME, required=True)
    validity = check_validity(validity_seconds, default_validity)
    check_text("model_id", model_id, limit=MAX_ID, required=True)
    return validity


def check_register(model_path: str, checkpoint: bytes, name: str, expected_model_id: str, encoding: str) -> str:
    """The encoding of a registration whose fields are well-formed (the checkpoint is read later)."""
    if bool(model_path) == bool(checkpoint):
        raise InvalidRequest("give exactly one of model_path or checkpoint bytes")
    check_text("model_path", model_path, limit=MAX_PATH)
    check_text("name", name, limit=MAX_NAME)
    check_text("expected_model_id", expected_model_id, limit=MAX_ID)
    encoding = encoding or "float32"
    if encoding not in ENCODINGS:
        raise InvalidRequest(f"encoding must be one of {ENCODINGS}, got {shown(encoding)}")
    return encoding


def check_model_code(model_file_text: str, model_class: str) -> None:
    """The eager convention's network code and class name, as sent (imported later, when loading)."""
    if model_class and not model_file_text:
        raise InvalidRequest("model_class names a class in model_file_text; send the model file's text too")
    if len(model_file_text) > MAX_MODEL_FILE:
        raise InvalidRequest(
            f"model_file_text is {len(model_file_text)} characters; at most {MAX_MODEL_FILE} are allowed"
        )
    if "\x00" in model_file_text:
        raise InvalidRequest("model_file_text must not contain NUL characters (it is Python source)")
    check_text("model_class", model_class, limit=MAX_NAME)
    if model_class and not model_class.isidentifier():
        raise InvalidRequest(f"model_class {shown(model_class)} is not a Python class name")


def parse_input_spec(text: str) -> InputSpec | None:
    """The input spec a registration states (JSON of ``InputSpec.to_dict``), or None when it states none."""
    if not text:
        return None
    if len(text) > MAX_SPEC:
        raise InvalidRequest(f"input_spec is {len(text)} characters; at most {MAX_SPEC} are allowed")
    try:
        return InputSpec.from_dict(json.loads(text))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and SourceError are ValueErrors
        detail = str(exc) if isinstance(exc, SourceError) else "not JSON"
        raise InvalidRequest(
            f'input_spec: {detail} (expected {{"shape": [1, 28, 28], "range": [0, 1], "normalize": null, '
            f'"outputs": "logits"}})'
        ) from None
