"""The license server's domain errors: what went wrong, in its own words, without gRPC.

:mod:`license_server.issuance` raises these; :mod:`license_server.servicer` owns the one table
that turns them into status codes. Every message is written for the client (no tracebacks, no
driver text), so the table can pass it on unchanged.
"""

from __future__ import annotations


class IssuanceError(Exception):
    """Base of every refusal the issuance logic gives; ``str(exc)`` is the client's message."""


class InvalidRequest(IssuanceError):
    """The request itself is malformed (a field too long, unprintable, out of range, inconsistent)."""


class NotFound(IssuanceError):
    """The named model, license or file does not exist."""


class PreconditionFailed(IssuanceError):
    """The request is fine but the server's state refuses it (a changed checkpoint, an unreadable file)."""


class Exhausted(IssuanceError):
    """Every license slot of the model is issued or being issued."""


class Conflict(IssuanceError):
    """Concurrent issuers took every candidate slot; the client may retry."""


class Unavailable(IssuanceError):
    """The server cannot do the work now (shutting down); the client may retry."""


class TimedOut(IssuanceError):
    """Fingerprint generation ran past the configured timeout."""


class ClientGone(IssuanceError):
    """The caller went away before the license was signed: nothing was written."""


class GenerationFailed(IssuanceError):
    """No fingerprint for the slot passed the re-check: a server-side failure with a precise message."""
