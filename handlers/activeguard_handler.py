"""TorchServe handler: ActiveGuard's control layer and license/session authentication.

Thin glue: TorchServe's request rows and headers become :class:`activeguard.guard.outcomes.Request`
objects, :class:`~activeguard.guard.guard.Guard` decides the whole batch in one forward pass,
and the outcomes become per-request statuses, JSON bodies and metrics. Nothing a client sends
can raise out of ``handle``: a failure is answered as that request's error, and the worker lives.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from activeguard.guard.guard import Guard
from activeguard.guard.outcomes import INTERNAL_ERROR, Outcome, Request, Verdict
from activeguard.guard.profile import PROFILE_FILE, Profile
from activeguard.models import inputs, sources
from handlers.composition import (
    CREDENTIAL_FIELDS,
    OwnerFrontEnd,
    attested_answer,
    body_credentials,
    owner_handler_class,
    owner_row,
    postprocess_all,
)
from handlers.envelopes import ROW_ORIGINS, RowOrigin, install
from handlers.metrics import LicenseLabels, record_batch, record_licenses
from handlers.revocations import ServerFetch

logger = logging.getLogger(__name__)

LICENSE_HEADER = "x-activeguard-license"
MODEL_FILE = "model.pt"  # the serialized file when the manifest does not name one

install()  # envelopes of this worker keep each row's request and its body's credentials


def _request(row: dict, headers: dict[str, str], inline: dict[str, Any] | None = None) -> Request:
    """Credentials from HTTP headers (case-insensitive) or, over gRPC, from the input map, or from a
    JSON body (``inline``: what an envelope took out of it, else read here).

    A field the client sent at all (even empty) is passed on, so the guard can call it malformed
    rather than missing; types are the guard's to check.
    """
    row = row if isinstance(row, dict) else {"body": row}
    lower = {str(k).lower(): v for k, v in (headers or {}).items()}
    body = row.get("data") if row.get("data") is not None else row.get("body")
    if inline is None:
        _, inline = body_credentials(body)  # a license in a JSON body, under any handler
    fields = {**inline, **{k: row[k] for k in CREDENTIAL_FIELDS if k in row}}
    license = lower[LICENSE_HEADER] if LICENSE_HEADER in lower else fields.get("license")
    auth = lower.get("authorization")
    session = auth[7:] if isinstance(auth, str) and auth.lower().startswith("bearer ") else fields.get("session")
    return Request(body=body, license=license, session=session, explain=fields.get("explain"))


def row_requests(context, rows: int) -> list[RowOrigin | None]:
    """Each row's request: itself, or under an envelope, the request whose instances it is (recorded
    by :mod:`handlers.envelopes`); None where rows cannot be matched to requests (every such row
    goes without credentials, which the log says)."""
    origins = getattr(context, ROW_ORIGINS, None)
    if origins is not None and len(origins) == rows:
        return list(origins)
    requests = len(getattr(context, "request_ids", None) or {}) or rows
    if requests != rows:
        logger.warning(
            "%d rows for %d requests: credentials cannot be matched; send one instance per request", rows, requests
        )
        return [None] * rows
    return [RowOrigin(i, None) for i in range(rows)]


def _read_batch(data: list, context, composed: bool = False) -> tuple[list[Request | None], list[int | None]]:
    """One Request per row and the index of the request it came from; a row whose headers or fields
    cannot be read becomes None (its own 500). ``composed``: the body is the row itself, credentials
    removed, as the owner's preprocess expects."""
    requests: list[Request | None] = []
    origins = row_requests(context, len(data))
    for row, origin in zip(data, origins):
        try:
            headers = context.get_all_request_header(origin.request) if origin is not None else {}
            request = _request(row, headers, origin.credentials if origin is not None else {})
            if composed:
                request.body = owner_row(row)
            requests.append(request)
        except Exception:
            logger.exception("could not read a request of a batch")
            requests.append(None)
    return requests, [o.request if o is not None else None for o in origins]


def serving_device(gpu_id: object) -> torch.device:
    """The device TorchServe assigned this worker, chosen as ``BaseHandler.initialize`` does."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def place(model: inputs.ClientView, device: torch.device) -> torch.device:
    """Move ``model`` to ``device`` and run a probe there; where it cannot run there (an exported
    program may hold CPU-only constants), keep it on the CPU and log why: slower, but serving."""
    if device.type == "cpu":
        return device
    try:
        model.to(device)
        with torch.no_grad():
            model(model.spec.random_rows(1).to(device))
        return device
    except Exception as exc:  # torch raises RuntimeError, NotImplementedError, ... for unmovable graphs
        model.to("cpu")
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        logger.warning("the model cannot run on %s (%s); serving it on the CPU", device, reason)
        return torch.device("cpu")


def load_archived(model_dir: Path, manifest: dict, profile: Profile) -> sources.LoadedModel:
    """The archived model, loaded as the profile says; refused (RuntimeError) unless it is the profiled one."""
    model = manifest.get("model") or {}
    serialized = model.get("serializedFile") or MODEL_FILE
    loaded = sources.load(model_dir / serialized, profile.source_options(model_dir, model.get("modelFile") or None))
    if loaded.model_id != profile.model_id:
        raise RuntimeError("the archive's weights do not match the profile's model id; repackage the model")
    if (loaded.source.name, loaded.spec) != (profile.source, profile.spec):
        raise RuntimeError(
            f"the archived model is a {loaded.source.name} with input {loaded.spec.to_dict()}, but the profile "
            f"says {profile.source} with {profile.spec.to_dict()}; repackage the model"
        )
    return loaded


def _fetch(profile: Profile) -> ServerFetch | None:
    """The gRPC client for a profile that names its license server as the revocation source."""
    return ServerFetch(profile.revocation_server, profile.model_id) if profile.revocation_server else None


class ActiveGuardHandler(BaseHandler):
    """Replaces ``initialize`` (our archive holds a model of any source plus a protection profile)
    and ``handle`` (one guarded forward pass per batch); keeps BaseHandler's attributes.

    The guard runs the model as a client reaches it (``LoadedModel.model``): normalization and
    probability outputs are the model's own business, the control layer always sees logits.
    """

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.context, self.manifest = context, context.manifest
        model_dir = Path(properties["model_dir"])
        profile = Profile.from_json((model_dir / PROFILE_FILE).read_text())
        loaded = load_archived(model_dir, self.manifest, profile)
        if profile.owner_handler:
            self._initialize_owner(context, profile, loaded)
        else:
            self.device = place(loaded.model, serving_device(properties.get("gpu_id")))
            self.map_location = self.device.type
            self.guard = Guard(loaded.model, profile, device=self.device, revocation_fetch=_fetch(profile))
            self.model, self.owner, self.front = self.guard.model, None, self.guard.front
        self.guard.revocations.start()  # a background refresh: no request waits for the list
        self.license_labels = LicenseLabels()
        self.initialized = True
        logger.info(
            "ActiveGuard ready: %s model %s on %s, handler %s, policy %s, paper mode %s",
            profile.source,
            profile.model_id[:16],
            self.device,
            profile.owner_handler or "ActiveGuard's tensor handler",
            profile.policy,
            profile.paper_mode,
        )

    def _initialize_owner(self, context, profile: Profile, loaded: sources.LoadedModel) -> None:
        """The owner's handler loads the model (on TorchServe's device); the guard runs it through
        the owner's preprocess and inference. The archived weights were checked to be the profiled
        ones; a probe warns where the owner's inference answers otherwise than the profiled model."""
        self.owner = owner_handler_class(profile.owner_handler)()
        self.owner.initialize(context)
        # the owner's handler holds the one served copy
        self.guard = Guard(None, profile, device="cpu", revocation_fetch=_fetch(profile))
        self.front = OwnerFrontEnd(self.owner, profile.spec)
        self.device = self.front.device
        self.map_location = self.device.type
        self.model = getattr(self.owner, "model", None)
        probe = profile.spec.random_rows(4, torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = torch.softmax(loaded.model(probe), 1)
            got = torch.softmax(
                self.front.logits(self.front.forward(self.front.fingerprint_input(probe).to(self.device))).float(), 1
            )
        gap = float((want - got.cpu()).abs().max())
        if gap > 1e-3:
            logger.warning(
                "the owner's inference answers differently from the profiled model (max probability gap %.3g): "
                "fingerprints may not authenticate",
                gap,
            )

    def handle(self, data: list, context) -> list:
        start = time.perf_counter()
        composed = self.owner is not None
        requests, request_of_row = _read_batch(data, context, composed)
        internal = Verdict(500, INTERNAL_ERROR, message="internal error")
        try:
            decided = iter(self.guard.decide([r for r in requests if r is not None], self.front))
            verdicts = [next(decided) if r is not None else internal for r in requests]
        except Exception:  # a bug must not kill the worker or leak a traceback to clients
            logger.exception("ActiveGuard failed on a batch")
            verdicts = [internal for _ in data]
        if composed:
            values = postprocess_all(self.owner, verdicts)
            answers = [self._answer(i, v, values.get(i), context) for i, v in enumerate(verdicts)]
        else:
            answers = [self.guard.render(v) for v in verdicts]
        for i, outcome in enumerate(answers):
            if outcome.status != 200:
                request = request_of_row[i]
                context.set_response_status(outcome.status, outcome.reason, idx=i if request is None else request)
        record_batch(context.metrics, answers, (time.perf_counter() - start) * 1000, self.guard.revocations.current())
        monitor = self.guard.monitor
        statistic = monitor.statistic if monitor is not None else None
        try:  # a metric must never cost a batch its answers
            record_licenses(context.metrics, verdicts, answers, self.guard.flags, statistic, self.license_labels)
        except Exception:
            logger.exception("could not record the per-license metrics of a batch")
        return [outcome.body if composed and outcome.status == 200 else json.dumps(outcome.body) for outcome in answers]

    def _answer(self, i: int, verdict: Verdict, value: Any, context) -> Outcome:
        """An owner-handler answer: ``value``, the owner's postprocess of the rows (its own form,
        untouched for a direct client), a JSON error, or, for the gateway, the answer beside the decision."""
        if verdict.status != 200 or verdict.outputs is None:
            outcome = self.guard.render(verdict)
            if outcome.status == 200:  # a credential check alone: the decision is the answer
                return Outcome(200, outcome.reason, json.dumps(outcome.body), outcome.user)
            return outcome
        if isinstance(value, Exception):  # the owner's code failed on this request's rows: only it pays
            logger.error("the owner's postprocess failed for request %d: %r", i, value)
            return self.guard.render(Verdict(500, INTERNAL_ERROR, message="internal error", explain=verdict.explain))
        if verdict.explain is not None:
            content_type = (
                context.get_response_content_type(i) if hasattr(context, "get_response_content_type") else None
            )
            value = attested_answer(value, verdict.explanation(), content_type)
        return Outcome(200, verdict.reason, value, verdict.user)
