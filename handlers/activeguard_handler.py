"""TorchServe handler: ActiveGuard's control layer and license/session authentication.

Thin glue: TorchServe's request rows and headers become :class:`activeguard.protection.Request`
objects, :class:`~activeguard.protection.Guard` decides the whole batch in one forward pass,
and the outcomes become per-request statuses, JSON bodies and metrics. Nothing a client sends
can raise out of ``handle``: a failure is answered as that request's error, and the worker lives.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from activeguard.models import load_model, model_id
from activeguard.protection import PROFILE_FILE, Guard, Outcome, Profile, Request

logger = logging.getLogger(__name__)

LICENSE_HEADER = "x-activeguard-license"
REQUESTS_METRIC = "ActiveGuardRequests"
AUTH_LATENCY_METRIC = "ActiveGuardAuthLatencyMs"
MODEL_FILE = "model.pt"


def _request(row: dict, headers: dict[str, str]) -> Request:
    """Credentials from HTTP headers (case-insensitive) or, over gRPC, from the input map."""
    lower = {str(k).lower(): v for k, v in (headers or {}).items()}
    body = row.get("data") if row.get("data") is not None else row.get("body")
    license = lower.get(LICENSE_HEADER) or row.get("license")
    auth = lower.get("authorization")
    session = auth[7:] if isinstance(auth, str) and auth.lower().startswith("bearer ") else row.get("session")
    return Request(body=body, license=license, session=session)


class ActiveGuardHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        profile = Profile.from_json((model_dir / PROFILE_FILE).read_text())
        model = load_model(model_dir / MODEL_FILE)
        if model_id(model) != profile.model_id:
            raise RuntimeError("the archive's weights do not match the profile's model id; repackage the model")
        self.guard = Guard(model, profile)
        self.initialized = True
        logger.info("ActiveGuard ready: model %s, policy %s, paper mode %s",
                    profile.model_id[:16], profile.policy, profile.paper_mode)

    def handle(self, data: list[dict], context) -> list[str]:
        start = time.perf_counter()
        try:
            requests = [_request(row, context.get_all_request_header(i)) for i, row in enumerate(data)]
            outcomes = self.guard.handle(requests)
        except Exception:  # a bug must not kill the worker or leak a traceback to clients
            logger.exception("ActiveGuard failed on a batch")
            outcomes = [Outcome(500, "internal_error", {"error": "internal error", "reason": "internal_error"})
                        for _ in data]
        elapsed_ms = (time.perf_counter() - start) * 1000
        metrics = context.metrics
        for i, outcome in enumerate(outcomes):
            if outcome.status != 200:
                context.set_response_status(outcome.status, outcome.reason, idx=i)
            metrics.add_counter(REQUESTS_METRIC, 1, dimensions=[Dimension("Reason", outcome.reason)])
        metrics.add_time(AUTH_LATENCY_METRIC, elapsed_ms, unit="ms")
        return [json.dumps(outcome.body) for outcome in outcomes]
