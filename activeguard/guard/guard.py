"""The serving-side guard: a batch of requests in, a decision per request out.

Framework-free on purpose: the TorchServe handler (``handlers/``) is thin glue around
:class:`Guard`, so every rule here is tested without a server. :meth:`Guard.decide` is a short
sequence of steps, each a collaborator with one job:

1. **read** every body into model input (:class:`~activeguard.guard.front.FrontEnd`, with the
   :class:`~activeguard.guard.parsing.BodyParser`: JSON ``{"inputs": ...}`` or ``.npy`` bytes);
2. **sort** each request by its credential (:class:`~activeguard.guard.credentials.CredentialCheck`:
   a gateway session, a signed license, or in paper mode a bare fingerprint) against the current
   signed revocation list (:mod:`activeguard.guard.revocation`);
3. **one forward pass** over every admitted input *and* every fingerprint to check
   (:class:`~activeguard.guard.batch.ModelPass`; a pass that fails splits into one per request);
4. **decide**: a license is admitted only if its fingerprint's output decodes to the licensed user;
   anything unauthorized gets the :class:`~activeguard.guard.policy.RefusalPolicy`'s answer.

A bad request gets its own 4xx outcome; it never fails the others in the batch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from activeguard.credentials.control import decide
from activeguard.guard import monitor
from activeguard.guard import outcomes as o
from activeguard.guard.answers import AnswerStamp
from activeguard.guard.batch import Batch, ModelPass, Outputs
from activeguard.guard.credentials import CredentialCheck
from activeguard.guard.front import FrontEnd
from activeguard.guard.monitor import ExtractionMonitor
from activeguard.guard.outcomes import EXPLANATION, Outcome, Request, Verdict, internal_error
from activeguard.guard.parsing import BodyParser
from activeguard.guard.policy import RefusalPolicy
from activeguard.guard.profile import Profile
from activeguard.guard.revocation import Fetch, revocation_source
from activeguard.guard.usage import UsageLedger
from activeguard.watermark import traffic
from activeguard.watermark.journal import JournalWriter

logger = logging.getLogger(__name__)


class Guard:
    """Decides a batch of requests against one model and its profile."""

    def __init__(
        self,
        model: nn.Module | None,
        profile: Profile,
        device: torch.device | str | None = None,
        revocation_fetch: Fetch | None = None,
    ):
        """``device`` is where the model runs (TorchServe's ``gpu_id``); requests are parsed on the
        CPU and moved there in one batch. Default: wherever the model's parameters already are.
        ``model`` None: every decision goes through a front end that runs its own model (an owner's handler).
        ``revocation_fetch`` reads the signed revocation list from ``profile.revocation_server`` (the
        handler's gRPC client; the library does not speak gRPC)."""
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device).eval() if model is not None else None
        self.profile = profile
        self.config = profile.control
        self.parser = BodyParser(profile.input_shape, profile.max_body_bytes, profile.max_rows)
        self.credentials = CredentialCheck(profile, self.parser)
        self.revocations = revocation_source(profile, self.credentials.license_keys, revocation_fetch)
        self.model_pass = ModelPass()
        self.policy = RefusalPolicy(self.config, profile.secret)
        self.front = FrontEnd(self.parser, self.model, self.device)
        # the worker's journal (answer records, usage, alerts), when the profile names a directory
        self.journal = JournalWriter(profile.answer_journal_dir) if profile.answer_journal_dir else None
        self.answers = AnswerStamp.from_profile(profile, self.journal)  # None: the answer watermark is off
        self.usage = UsageLedger(profile.model_id) if self.journal is not None else None
        settings = profile.monitor_settings
        self.monitor = (
            ExtractionMonitor(settings, math.prod(profile.input_shape)) if settings.policy != monitor.OFF else None
        )
        self.flags: list[monitor.Flag] = []  # the licenses the last batch flagged (the handler's metrics)

    def handle(self, requests: list[Request]) -> list[Outcome]:
        """One JSON outcome per request, in order (the tensor front end: bodies are JSON or .npy)."""
        return [self.render(verdict) for verdict in self.decide(requests)]

    def decide(self, requests: list[Request], front: FrontEnd | None = None) -> list[Verdict]:
        """One verdict per request, in order. Nothing a request carries can make this raise or
        change another request's verdict: each request is handled inside its own error boundary.

        ``front`` turns request bodies into model input and runs the model; by default the
        guard's own (JSON/.npy tensors in the input spec, the model is a :class:`ClientView`).
        """
        front = front or self.front
        self.flags = []
        state = self.revocations.current()  # one look at the revocation list per batch
        batch = Batch(state.revoked, state.stale)
        reads = front.read_all(requests)
        for i, request in enumerate(requests):
            try:
                self.credentials.sort(i, request, reads[i], batch, front)
            except Exception:  # a bug, not the client's fault: only this request pays for it
                logger.exception("request %d of a batch could not be read", i)
                batch.fail(i)
        outputs = self.model_pass.forward(batch, front)
        for i in batch.undecided():
            try:
                batch.verdicts[i] = self._verdict(i, outputs, batch, front)
            except Exception:
                logger.exception("request %d of a batch could not be decided", i)
                batch.verdicts[i] = internal_error(batch.explain.get(i))
        verdicts = [batch.verdicts[i] for i in range(len(requests))]
        self._account(verdicts, batch)
        for i, verdict in batch.verdicts.items():
            if not verdict.admitted:
                logger.info("refused request %d: %s", i, verdict.reason)
        return verdicts

    def _account(self, verdicts: list[Verdict], batch: Batch) -> None:
        """Each verdict's license and rows; the batch's answer records, alerts and (every few seconds)
        usage in one journal write, durable before any answer of the batch leaves."""
        for i, verdict in enumerate(verdicts):
            verdict.license_id = batch.license_ids.get(i)
            verdict.rows = len(batch.inputs[i]) if i in batch.inputs else 1
            if self.usage is not None and verdict.license_id is not None:
                self.usage.count(verdict.license_id, verdict.reason, verdict.rows, verdict.admitted)
        if self.journal is None:
            return
        entries = self.answers.take() if self.answers is not None else []
        for flag in self.flags:
            policy = traffic.SUSPEND if flag.policy == monitor.SUSPEND else traffic.NOTIFY
            alert = traffic.AlertEntry(
                self.profile.model_id, flag.license_id, "prada", policy, time.time(), flag.detail
            )
            entries.append(alert.to_entry())
        if self.usage is not None:
            entries += self.usage.due(force=bool(self.flags))  # an alert goes with the usage behind it
        self.journal.write(entries)

    def _verdict(self, i: int, outputs: Outputs, batch: Batch, front: FrontEnd) -> Verdict:
        """Request ``i``'s verdict once the forward pass has answered its input and its fingerprint; an
        admitted answer under a license carries that license's answer watermark."""
        verdict = self._decision(i, outputs, batch, front)
        license_id = batch.license_ids.get(i)
        if not (verdict.admitted and verdict.outputs is not None and license_id):
            return verdict
        if self.monitor is not None:
            blocked = self.monitor.refusal(license_id)
            if blocked is not None:
                return _extraction_refusal(blocked, verdict.explain)
            raw = verdict.outputs
        if self.answers is not None:
            verdict.outputs = self.answers.apply(
                verdict.outputs, batch.inputs[i], license_id, verdict.user or "", front
            )
        if self.monitor is not None:  # on the model's own top classes, not the watermark's
            flag = self.monitor.observe(license_id, batch.inputs[i], front.logits(raw).argmax(1).cpu())
            if flag is not None:
                logger.warning("extraction monitor flagged license %s (%s): %s", license_id, flag.policy, flag.detail)
                self.flags.append(flag)
        return verdict

    def _decision(self, i: int, outputs: Outputs, batch: Batch, front: FrontEnd) -> Verdict:
        explain = batch.explain.get(i)
        raw = outputs[("in", i)][0] if i in batch.inputs else None
        if i in batch.sessions:
            claims = batch.sessions[i]
            return Verdict(
                200, o.SESSION_AUTHORIZED, raw, user=claims.user, user_index=claims.user_index, explain=explain
            )
        if i in batch.passed:
            user, index = batch.passed[i]
            return Verdict(200, o.AUTHORIZED, raw, user=user, user_index=index, explain=explain)
        if i in batch.checks:
            _, licensed_index, user = batch.checks[i]
            decision = decide(outputs[("fp", i)][1], self.config)
            if decision.authorized[0] and (licensed_index is None or int(decision.user[0]) == licensed_index):
                index = int(decision.user[0])
                if licensed_index is not None:
                    self.credentials.remember_pass(batch.fingerprint_keys[i], index)
                reason = o.AUTHORIZED if licensed_index is not None else o.PAPER_AUTHORIZED
                return Verdict(200, reason, raw, user=user or f"user-{index}", user_index=index, explain=explain)
            batch.denied[i] = o.FO_MISMATCH
        return self.policy.refuse(raw, batch.denied[i], explain, front)

    def render(self, verdict: Verdict) -> Outcome:
        """The tensor front end's JSON answer: probabilities, or an error; the explanation where attested."""
        if verdict.status != 200:
            body: dict[str, Any] = {"error": verdict.message, "reason": verdict.reason}
        else:
            outputs = verdict.outputs
            body = {} if outputs is None else {"outputs": torch.softmax(self.front.logits(outputs).float(), 1).tolist()}
        if verdict.explain is not None:
            body[EXPLANATION] = verdict.explanation()
        return Outcome(verdict.status, verdict.reason, body, user=verdict.user if verdict.admitted else None)


def _extraction_refusal(policy: str, explain: Any) -> Verdict:
    """A license the extraction monitor flagged: refused while throttled, or until its revocation holds."""
    if policy == monitor.THROTTLE:
        return Verdict(
            429,
            o.EXTRACTION_THROTTLED,
            message="throttled: this license's queries look like model extraction",
            explain=explain,
        )
    return Verdict(
        403,
        o.EXTRACTION_SUSPENDED,
        message="suspended: this license's queries look like model extraction",
        explain=explain,
    )


def _model_device(model: nn.Module | None) -> torch.device:
    first = next(iter(model.parameters()), None) if model is not None else None
    return first.device if first is not None else torch.device("cpu")
