"""ActiveGuard in front of an owner's own TorchServe handler.

A protected archive keeps the owner's handler. At ``initialize`` the owner's handler is loaded the
way TorchServe's model loader would load it (a file in the archive, or a stock module of
``ts.torch_handler``) and initialized with the worker's context, so it loads the model on the
device TorchServe assigned. Per batch, :class:`OwnerFrontEnd` lets the guard

- call the owner's ``preprocess`` on each request alone (a request it cannot read fails alone),
- append each licensed request's fingerprint, which is already model input (it skips preprocess),
- run the owner's ``inference`` once over everything,

and the handler hands each admitted request's rows (or a refused one's random rows, under
``random``) to the owner's ``postprocess``: a refused answer has the form of a real one.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import io
import json
from pathlib import Path
from typing import Any

import torch

from activeguard.guard.front import FrontEnd
from activeguard.guard.outcomes import EXPLANATION, InputError, Read, Request, Verdict
from activeguard.models.inputs import InputSpec

# Fields of a request that are ActiveGuard's, not the owner's: read, then removed from the row the
# owner's preprocess sees (over gRPC they arrive in the same input map as the payload; over HTTP they
# may sit in a JSON object body, which the owner's handler then gets without them).
CREDENTIAL_FIELDS = ("license", "session", "explain")
HANDLER_METHODS = ("initialize", "preprocess", "inference", "postprocess")


class OwnerHandlerError(ValueError):
    """The owner's handler cannot be composed with (missing, a function entry point, several classes)."""


def handler_module_name(handler: str) -> tuple[str, bool]:
    """(module name, whether it is a file in the archive) for a manifest's ``handler`` entry.

    TorchServe accepts ``my_handler.py``, ``my_handler.py:function`` and stock names such as
    ``base_handler``; a function entry point hides preprocess/inference/postprocess, so it is refused.
    """
    if ":" in handler:
        raise OwnerHandlerError(
            f"handler {handler!r} is a function entry point; ActiveGuard composes with a handler class "
            "(a BaseHandler subclass, or any class with preprocess, inference and postprocess)"
        )
    if handler.endswith(".py"):
        return Path(handler).stem, True
    return handler, False


def owner_handler_class(handler: str) -> type:
    """The owner's handler class, imported as TorchServe imports it (the archive folder is on sys.path)."""
    name, in_archive = handler_module_name(handler)
    try:
        module = importlib.import_module(name) if in_archive else importlib.import_module(f"ts.torch_handler.{name}")
    except ImportError as exc:
        raise OwnerHandlerError(f"cannot import the owner's handler {handler!r}: {exc}") from exc
    classes = [
        c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
    ]  # TorchServe's own rule: exactly one class defined in the module
    if not in_archive:  # a stock module (base_handler) may define helpers beside its handler class
        classes = [c for c in classes if all(hasattr(c, m) for m in HANDLER_METHODS)]
    if len(classes) != 1:
        raise OwnerHandlerError(f"handler {handler!r} must define exactly one class, found {len(classes)}")
    missing = [m for m in HANDLER_METHODS if not callable(getattr(classes[0], m, None))]
    if missing:
        raise OwnerHandlerError(f"handler class {classes[0].__name__} has no {', '.join(missing)}")
    return classes[0]


def body_credentials(body: Any) -> tuple[Any, dict[str, Any]]:
    """(the body without ActiveGuard's credential fields, those fields) for a JSON object body: the
    dict TorchServe decoded from an ``application/json`` request, or JSON bytes that hold an object.
    Anything else is returned as it is, with no credentials."""
    parsed = body
    if isinstance(body, (bytes, bytearray, str)):
        text = bytes(body).lstrip()[:1] if not isinstance(body, str) else body.lstrip()[:1].encode()
        if text != b"{":
            return body, {}
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return body, {}
    if not isinstance(parsed, dict) or not any(k in parsed for k in CREDENTIAL_FIELDS):
        return body, {}
    found = {k: parsed[k] for k in CREDENTIAL_FIELDS if k in parsed}
    cleaned = {k: v for k, v in parsed.items() if k not in CREDENTIAL_FIELDS}
    if isinstance(body, dict):
        return cleaned, found
    encoded = json.dumps(cleaned)
    return (encoded if isinstance(body, str) else encoded.encode("utf-8")), found


def owner_row(row: Any) -> Any:
    """The request as the owner's handler would have received it unprotected: credentials removed from
    the row (gRPC's input map) and from a JSON object body (HTTP)."""
    if not isinstance(row, dict):
        return row
    cleaned = {k: v for k, v in row.items() if k not in CREDENTIAL_FIELDS}
    for field in ("body", "data"):
        if field in cleaned:
            cleaned[field] = body_credentials(cleaned[field])[0]
    return cleaned


def postprocess_all(owner: Any, verdicts: list[Verdict]) -> dict[int, Any]:
    """The owner's answer for each request with rows to answer: ``postprocess`` once over all of them
    where each has one row (as unprotected), else, or where that raises, each request alone; a
    request whose rows make the owner's code raise gets the exception instead."""
    answering = [i for i, v in enumerate(verdicts) if v.status == 200 and v.outputs is not None]
    if len(answering) > 1 and all(len(verdicts[i].outputs) == 1 for i in answering):
        try:
            answers = owner.postprocess(torch.cat([verdicts[i].outputs for i in answering]))
            if isinstance(answers, list) and len(answers) == len(answering):
                return dict(zip(answering, answers))
        except Exception:
            pass  # find the request that fails, below
    values: dict[int, Any] = {}
    for i in answering:
        try:
            answer = owner.postprocess(verdicts[i].outputs)
            values[i] = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        except Exception as exc:
            values[i] = exc
    return values


def response_bytes(value: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """A postprocessed answer as TorchServe would put it on the wire (bytes, str, tensor, else JSON)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), content_type or "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    if isinstance(value, torch.Tensor):
        buf = io.BytesIO()
        torch.save(value, buf)
        return buf.getvalue(), content_type or "application/octet-stream"
    return json.dumps(value, indent=2).encode("utf-8"), content_type or "application/json"


def attested_answer(value: Any, explanation: dict[str, Any], content_type: str | None) -> str:
    """A gateway-attested request's answer: the owner's answer, opaque, beside the decision.
    Only the gateway can sign such a request; it unwraps this before its client sees it."""
    data, kind = response_bytes(value, content_type)
    return json.dumps({EXPLANATION: explanation, "payload_b64": base64.b64encode(data).decode(), "content_type": kind})


class OwnerFrontEnd(FrontEnd):
    """The owner's preprocess and inference, as the guard's front end."""

    def __init__(self, owner: Any, spec: InputSpec):
        super().__init__(parser=None, model=None, device=torch.device("cpu"))
        self.owner, self.spec = owner, spec

    @property
    def device(self) -> torch.device:
        device = getattr(self.owner, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")

    def read_all(self, requests: list[Request]) -> list[Read]:
        """The owner's preprocess over every payload at once, as unprotected; where that raises or
        does not make one row per request, each request alone, so only a bad one fails."""
        payloads = [i for i, r in enumerate(requests) if r.explain is None]
        results: list[Read] = [(None, {}) for _ in requests]  # explain: the gateway's credential check
        try:
            rows = self.owner.preprocess([requests[i].body for i in payloads]) if len(payloads) > 1 else None
        except Exception:
            rows = None
        if isinstance(rows, torch.Tensor) and rows.dim() >= 1 and len(rows) == len(payloads):
            checked = self._checked(rows)
            for n, i in enumerate(payloads):
                results[i] = checked if isinstance(checked, Exception) else (checked[n : n + 1], {})
            return results
        for i in payloads:
            try:
                results[i] = self.read(requests[i])
            except Exception as exc:
                results[i] = exc
        return results

    def read(self, request: Request) -> tuple[torch.Tensor | None, dict[str, Any]]:
        if request.explain is not None:  # the gateway's credential check: no payload to read
            return None, {}
        try:
            rows = self.owner.preprocess([request.body])
        except Exception as exc:  # the owner's code raised on this request's payload: its 400 alone
            raise InputError(f"the model's handler could not read this request ({type(exc).__name__})") from None
        if not isinstance(rows, torch.Tensor) or rows.dim() < 1 or len(rows) < 1:
            raise InputError("the model's handler made no input rows of this request")
        checked = self._checked(rows)
        if isinstance(checked, Exception):
            raise checked
        return checked, {}

    def _checked(self, rows: torch.Tensor) -> torch.Tensor | InputError:
        if tuple(rows.shape[1:]) != self.spec.shape:
            return InputError(f"the model's handler made rows of shape {tuple(rows.shape[1:])}, not {self.spec.shape}")
        return rows

    def fingerprint_input(self, fingerprint: torch.Tensor) -> torch.Tensor:
        """Fingerprints live in the spec's value range; the owner's preprocess output is normalized."""
        return self.spec.normalize(fingerprint)

    def forward(self, batch: torch.Tensor) -> Any:
        out = self.owner.inference(batch)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise RuntimeError("the owner's inference must answer a (rows, classes) tensor")
        return out

    def logits(self, raw: Any) -> torch.Tensor:
        return self.spec.logits(raw)
