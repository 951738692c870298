"""The license as an HTTP header: compact on the way out, every accepted form on the way in.

A 28×28 fingerprint's license is about 9 KB as text, over TorchServe's 8 KB header limit, so the
header carries base64(zlib(license text)).
"""

from __future__ import annotations

import base64
import binascii
import zlib

from activeguard.credentials.licenses import MalformedLicense

MAX_LICENSE_BYTES = 1024 * 1024


def encode_license_header(license_text: str) -> str:
    """The compact header form: base64(zlib(.aglicense text)); fits TorchServe's 8 KB header limit."""
    return base64.b64encode(zlib.compress(license_text.encode("utf-8"), 9)).decode("ascii")


def decode_license_header(raw: str | bytes) -> str:
    """Accept the .aglicense text itself, its base64, or the compact zlib form; anything else is a
    :class:`~activeguard.credentials.licenses.MalformedLicense`."""
    if isinstance(raw, (bytes, bytearray)):
        text = bytes(raw).decode("utf-8", errors="replace").strip()
    elif isinstance(raw, str):
        text = raw.strip()
    else:
        raise MalformedLicense(f"credential must be a string, got {type(raw).__name__}")
    if len(text) > 2 * MAX_LICENSE_BYTES:
        raise MalformedLicense("license too large")
    if text.startswith("{"):
        return text
    try:
        data = base64.b64decode(text, validate=True)
        if data[:1] == b"\x78":  # zlib stream; bounded so a small header cannot inflate to gigabytes
            inflater = zlib.decompressobj()
            data = inflater.decompress(data, MAX_LICENSE_BYTES)
            if inflater.unconsumed_tail:
                raise ValueError("license too large")
        return data.decode("utf-8")
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError):
        raise MalformedLicense("license is neither .aglicense text nor its (compressed) base64") from None
