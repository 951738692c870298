"""The protection profile: what a packaged archive tells the handler about guarding its model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activeguard.credentials.control import ControlConfig
from activeguard.guard import monitor
from activeguard.guard.revocation import STALE_POLICIES
from activeguard.models.inputs import InputSpec, SpecOverrides
from activeguard.models.sources import SOURCES, SourceOptions

PROFILE_FORMAT = "activeguard-profile/1"
PROFILE_FILE = "activeguard-profile.json"
MODEL_CODE_FILE = "model.py"  # the eager convention's network code inside an archive (--model-file)


@dataclass(frozen=True)
class Profile:
    """What the archive tells the handler about protecting its model.

    ``source``, ``input_spec`` and ``model_class`` say how to load the archived model exactly as it
    was packaged (:mod:`activeguard.models.sources`); a profile written before they existed means a
    project checkpoint whose input is ``input_shape`` in [0, 1].
    """

    model_id: str
    input_shape: tuple[int, ...]
    num_classes: int = 10
    confidences: tuple[float, ...] = (0.2, 0.3, 0.4)
    epsilon: float = 0.01
    policy: str = "random"
    paper_mode: bool = False
    license_public_keys: dict[str, str] = field(default_factory=dict)  # key id -> PEM
    gateway_public_key: str | None = None  # PEM
    revocation_file: str | None = None  # a signed revocation list (activeguard.credentials.revocations)
    revocation_server: str | None = None  # or the license server (host:port) to fetch it from
    revocation_refresh_s: float = 5.0  # how often the list is fetched (the staleness bound when all is well)
    revocation_max_age_s: float = 300.0  # past this age of the held list the stale policy applies
    revocation_stale_policy: str = "refuse"  # "refuse" (fail closed) or "serve" (keep the last list)
    max_body_bytes: int = 4 * 1024 * 1024
    max_rows: int = 256
    source: str = "checkpoint"
    input_spec: dict[str, Any] | None = None  # InputSpec.to_dict()
    model_class: str | None = None  # the network class in MODEL_CODE_FILE (eager convention only)
    # The owner's own handler (a manifest ``handler`` entry: "their_handler.py" or a stock name such
    # as "base_handler"), composed with ActiveGuard; None: ActiveGuard's JSON/.npy tensor handler.
    owner_handler: str | None = None
    # the ranked FO space's runner-up grid (activeguard.credentials.fo_space); empty: the paper's (t, c) space
    runner_up_confidences: tuple[float, ...] = ()
    # keys the refusal policy's permutations (hex; activeguard.guard.policy): drawn at package time, so every
    # worker and replica answers an unlicensed input alike. None (an older archive): each worker draws its own.
    control_secret: str | None = field(default=None, repr=False)
    # the answer watermark (activeguard.watermark.answers): the band's log-probability margin (0: off), the
    # owner's key file on the serving host (never in the archive) and the journal directory the answers in the
    # band are written to (activeguard.watermark.journal), which the license server ingests
    answer_watermark_margin: float = 0.0
    answer_key_file: str | None = None
    answer_journal_dir: str | None = None
    # the extraction monitor (activeguard.guard.monitor: PRADA per license): its policy on a flag (off, alert,
    # throttle, suspend), the Shapiro-Wilk threshold, the distances before the first test, how long a throttled
    # license is refused, and how many licenses a worker tracks. Alerts and usage go to the journal above.
    extraction_monitor: str = monitor.OFF
    extraction_delta: float = monitor.DEFAULT_DELTA
    extraction_min_queries: int = monitor.DEFAULT_MIN_QUERIES
    extraction_cooldown_s: float = monitor.DEFAULT_COOLDOWN_S
    extraction_max_licenses: int = monitor.DEFAULT_MAX_LICENSES

    def validated(self) -> Profile:
        """This profile, once its control settings (K, C_fp, ε, policy) and input spec are known to be usable."""
        _ = self.control  # building the ControlConfig raises ValueError on bad settings
        if self.paper_mode and self.runner_up_confidences:
            raise ValueError("paper mode keeps the paper's FO space: a bare output is the credential")
        if self.control_secret is not None:
            try:
                if len(bytes.fromhex(self.control_secret)) < 16:
                    raise ValueError
            except ValueError:
                raise ValueError("control_secret must be at least 16 bytes of hex") from None
        if self.revocation_file and self.revocation_server:
            raise ValueError("a profile takes its revocation list from a file or from a server, not both")
        if self.revocation_stale_policy not in STALE_POLICIES:
            raise ValueError(f"revocation_stale_policy must be one of {', '.join(STALE_POLICIES)}")
        if not (self.revocation_refresh_s > 0 and self.revocation_max_age_s > 0):
            raise ValueError("revocation_refresh_s and revocation_max_age_s must be positive")
        if not (self.max_rows >= 1 and self.max_body_bytes >= 1):
            raise ValueError("max_rows and max_body_bytes must be at least 1")
        if not (self.answer_watermark_margin >= 0 and math.isfinite(self.answer_watermark_margin)):
            raise ValueError("answer_watermark_margin must be a non-negative number of nats (0: off)")
        if self.answer_watermark_margin and not (self.answer_key_file and self.answer_journal_dir):
            raise ValueError("an answer watermark needs its key file and a journal directory")
        self.monitor_settings.validated()
        if self.extraction_monitor != monitor.OFF and not self.answer_journal_dir:
            raise ValueError("the extraction monitor needs a journal directory for its alerts")
        if self.source not in SOURCES:
            raise ValueError(f"profile source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.spec.shape != tuple(self.input_shape):  # SourceError is a ValueError too
            raise ValueError(
                f"profile input_shape {tuple(self.input_shape)} differs from its input spec's {self.spec.shape}"
            )
        return self

    @property
    def spec(self) -> InputSpec:
        return (
            InputSpec.from_dict(self.input_spec) if self.input_spec is not None else InputSpec(tuple(self.input_shape))
        )

    def source_options(self, model_dir: Path, model_file: str | None = None) -> SourceOptions:
        """How to load the archived model as packaged: its own input spec, and its code for the eager
        convention (``model_file``: the manifest's modelFile, when the owner's archive names one)."""
        eager = self.source == "eager"
        return SourceOptions(
            model_dir / (model_file or MODEL_CODE_FILE) if eager else None,
            self.model_class,
            SpecOverrides.pinned(self.spec),
        )

    @property
    def monitor_settings(self) -> monitor.MonitorSettings:
        return monitor.MonitorSettings(
            policy=self.extraction_monitor,
            delta=self.extraction_delta,
            min_queries=self.extraction_min_queries,
            cooldown_s=self.extraction_cooldown_s,
            max_licenses=self.extraction_max_licenses,
        )

    @property
    def secret(self) -> bytes | None:
        return bytes.fromhex(self.control_secret) if self.control_secret else None

    @property
    def control(self) -> ControlConfig:
        return ControlConfig(
            self.num_classes, self.confidences, self.epsilon, self.policy, tuple(self.runner_up_confidences)
        )

    def to_json(self) -> str:
        doc = dict(
            self.__dict__,
            format=PROFILE_FORMAT,
            input_shape=list(self.input_shape),
            confidences=list(self.confidences),
            runner_up_confidences=list(self.runner_up_confidences),
        )
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        doc = json.loads(text)
        if doc.pop("format", None) != PROFILE_FORMAT:
            raise ValueError(f"not an {PROFILE_FORMAT} document")
        doc["input_shape"] = tuple(doc["input_shape"])
        doc["confidences"] = tuple(doc["confidences"])
        doc["runner_up_confidences"] = tuple(doc.get("runner_up_confidences", ()))
        return cls(**doc).validated()
