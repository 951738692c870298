"""The deployment files under deploy/: Kubernetes manifests, image build files, alerts and dashboard.

Offline. Each kustomization (the base, both overlays, the placeholder Secrets, and the optional
components on top of an overlay) is rendered with ``kubectl kustomize`` and every rendered document
is validated strictly (unknown fields are errors) against the Kubernetes schemas bundled with
kubernetes-validate, at a fixed Kubernetes version. Without kubectl these tests are skipped and say so.

KServe's custom resources (InferenceService, ServingRuntime) are NOT validated against a schema:
KServe's CRDs are not in this repository. They get structural checks here and a warning that says
they were not validated.

Beyond the schemas: every image a manifest names has a build stage in deploy/docker/Dockerfile
(``[REGISTRY/]activeguard/<stage>[:TAG][@DIGEST]``), Secrets hold only placeholders and no other
resource carries a key or token, every pod runs as non-root, the NetworkPolicies admit only the
documented peers, the servers' arguments parse with their own command lines, and the metric names
in deploy/monitoring/metrics.txt are exactly those the alert rules and the dashboard use.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"
MONITORING = DEPLOY / "monitoring"
OPERATIONS = ROOT / "docs" / "operations.md"

KUBERNETES_VERSION = "1.32.0"  # the schemas every rendered document is validated against
NOT_VALIDATED_GROUPS = {"serving.kserve.io"}  # custom resources without a schema in this repository

# name -> (kustomization directory, components added on top of it); a Component cannot render alone
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("kubernetes/base", ()),
    "small": ("kubernetes/overlays/small", ()),
    "production": ("kubernetes/overlays/production", ()),
    "secrets": ("kubernetes/secrets", ()),
    "small+kserve": ("kubernetes/overlays/small", ("kubernetes/components/kserve",)),
    "production+direct-access": ("kubernetes/overlays/production", ("kubernetes/components/direct-access",)),
}
OVERLAYS = ["small", "production"]
NAMESPACE = "activeguard"
MONITORING_NAMESPACE = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
OPS_NAMESPACE = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "activeguard-ops"}}}
IMAGE = re.compile(r"^(?:[^/]+/)*activeguard/(?P<stage>[a-z0-9][a-z0-9-]*)(?::[\w][\w.-]*)?(?:@sha256:[0-9a-f]{64})?$")
PLACEHOLDER = "REPLACE_ME"


def _kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)
    if found is None:
        pytest.skip(
            "kubectl not found (on PATH or at /usr/bin/kubectl): the Kubernetes manifests were NOT rendered "
            "or validated"
        )
    return found


@functools.cache
def _render_cached(name: str) -> tuple[dict[str, Any], ...]:
    directory, components = TARGETS[name]
    root = DEPLOY / directory
    with tempfile.TemporaryDirectory(prefix="activeguard-kustomize-") as tmp:
        if components:  # a throwaway kustomization: the overlay plus the components (relative paths only)
            doc = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(root, tmp)],
                "components": [os.path.relpath(DEPLOY / c, tmp) for c in components],
            }
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc))
            root = Path(tmp)
        result = subprocess.run(
            [_kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=120, check=False
        )
    assert result.returncode == 0, f"kubectl kustomize {directory} {components} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(name: str) -> list[dict[str, Any]]:
    """The rendered documents of a target (a deep copy: tests may not change each other's input)."""
    _kubectl()
    return copy.deepcopy(list(_render_cached(name)))


def _group(doc: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _images(value: Any) -> list[str]:
    """Every ``image`` value anywhere in a document (pods, init containers, custom resources)."""
    if isinstance(value, dict):
        found = [value["image"]] if isinstance(value.get("image"), str) else []
        return found + [i for v in value.values() for i in _images(v)]
    if isinstance(value, list):
        return [i for v in value for i in _images(v)]
    return []


def _pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(where, pod-level securityContext holder, containers) of every pod template in a document."""
    kind, spec = doc["kind"], doc.get("spec", {})
    pod = None
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        pod = spec["template"]["spec"]
    elif kind == "CronJob":
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        pod = spec
    if pod is not None:
        return [(f"{kind}/{doc['metadata']['name']}", pod, pod.get("initContainers", []) + pod["containers"])]
    if kind == "InferenceService":
        predictor = spec["predictor"]
        containers = predictor.get("initContainers", []) + predictor.get("containers", [])
        return [(f"{kind}/{doc['metadata']['name']}", predictor, containers + [predictor["model"]])]
    if kind == "ServingRuntime":  # a container template: its pod's settings come from the InferenceService
        return [
            (f"{kind}/{doc['metadata']['name']}", {"securityContext": {"seccompProfile": None}}, spec["containers"])
        ]
    return []


def _containers(docs: list[dict[str, Any]], image_stage: str) -> list[dict[str, Any]]:
    out = []
    for doc in docs:
        for _, _, containers in _pods(doc):
            for c in containers:
                m = IMAGE.match(c.get("image", ""))
                if m and m["stage"] == image_stage:
                    out.append(c)
    return out


# -- rendering and schema validation ---------------------------------------------------------------


@pytest.mark.parametrize("target", list(TARGETS))
def test_manifests_render_and_validate_strictly(target):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    docs = render(target)
    assert docs, f"{target} rendered nothing"
    errors = []
    for doc in docs:
        if _group(doc) in NOT_VALIDATED_GROUPS:
            continue  # test_kserve_resources_are_reported_not_validated
        where = f"{doc['kind']}/{doc['metadata'].get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, f"{target} does not validate against Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(errors)


def test_validation_is_strict():
    """An unknown field in a pod template fails validation: the check above would catch a typo."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    deployment = _named(render("base"), "Deployment", "gateway")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50071}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kserve_resources_are_reported_not_validated():
    docs = render("small+kserve")
    custom = [d for d in docs if _group(d) in NOT_VALIDATED_GROUPS]
    assert sorted(d["kind"] for d in custom) == ["InferenceService", "ServingRuntime"]
    isvc = _named(docs, "InferenceService", "activeguard")
    runtime = _named(docs, "ServingRuntime", "activeguard-torchserve")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in custom)
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for volume in isvc["spec"]["predictor"]["volumes"]:
        if "configMap" in volume:  # the generated name, hash suffix included
            assert volume["configMap"]["name"] in config_maps
    assert _named(docs, "Deployment", "torchserve")["spec"]["replicas"] == 0
    gateway = json.loads(_config_map(docs, "gateway-config")["data"]["gateway.json"])
    assert all(u.startswith("http://activeguard-predictor:") for m in gateway["models"] for u in m["upstreams"])
    warnings.warn(
        "KServe InferenceService and ServingRuntime (deploy/kubernetes/components/kserve) were NOT validated "
        "against a schema: KServe's CRDs are not in this repository; only names, images and security settings "
        "were checked",
        UserWarning,
        stacklevel=1,
    )


# -- what runs where ---------------------------------------------------------------------------------


def _config_map(docs: list[dict[str, Any]], generated: str) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and re.fullmatch(rf"{generated}(-[a-z0-9]+)?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one ConfigMap {generated}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return _named(docs, kind, name)["spec"]["template"]["spec"]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def _arg(container: dict[str, Any], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in container.get("args", []) if a.startswith(flag + "=")]
    assert len(values) == 1, f"{container['name']}: expected one {flag}=..., got {container.get('args')}"
    return values[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_license_server_replicas_share_one_key_and_one_database(overlay):
    docs = render(overlay)
    deployment = _named(docs, "Deployment", "license-server")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    server = _container(pod, "license-server")
    (db,) = [e for e in server["env"] if e["name"] == "ACTIVEGUARD_LICENSE_DB"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "license-server-database", "key": "url"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["license-server-keys"]["secret"]["secretName"] == "license-server-keys"
    # the signing key: copied 0600 from the Secret into a memory emptyDir the server reads
    install = _container(pod, "install-signing-key")
    assert install["command"][:3] == ["install", "-m", "0600"]
    assert install["command"][-1] == _arg(server, "--signing-key")
    assert "emptyDir" in volumes["keys"] and volumes["keys"]["emptyDir"].get("medium") == "Memory"
    # the admin token hash straight from the Secret
    hash_file = _arg(server, "--admin-token-hash-file")
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == hash_file]
    assert mount["name"] == "license-server-keys" and mount["subPath"] == "admin_token.sha256"
    postgres = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres"]
    assert bool(postgres) == (overlay == "small"), "the small overlay runs PostgreSQL; production uses an external one"


def test_gateway_scales_with_an_hpa_and_shares_one_key():
    for overlay in OVERLAYS:
        docs = render(overlay)
        hpa = _named(docs, "HorizontalPodAutoscaler", "gateway")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
        assert "replicas" not in _named(docs, "Deployment", "gateway")["spec"], "the HPA owns the replica count"
        pod = _pod_spec(docs, "Deployment", "gateway")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["gateway-keys"]["secret"]["secretName"] == "gateway-keys"
        config = json.loads(_config_map(docs, "gateway-config")["data"]["gateway.json"])
        assert _container(pod, "install-signing-key")["command"][-1] == config["signing_key"]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed why
        raise AssertionError(f"arguments do not parse: {argv}") from exc


def _entrypoint(stage: str) -> list[str]:
    return json.loads(_dockerfile_stages()[stage]["entrypoint"])


def test_server_arguments_parse_with_their_command_lines():
    from gateway import cli as gateway_cli
    from license_server.cli import build_parser

    assert _entrypoint("license-server")[-2:] == ["activeguard-license-server", "serve"]
    assert _entrypoint("gateway")[-2:] == ["activeguard", "gateway"]
    gateway_parser = argparse.ArgumentParser()
    gateway_cli.register(gateway_parser.add_subparsers(dest="command"))
    parsed = []
    for target in ["small", "production", "small+kserve"]:
        docs = render(target)
        for c in _containers(docs, "license-server"):
            if "command" not in c:
                args = _parse(build_parser(), ["serve", *c["args"]])
                assert args.host == "0.0.0.0" and args.port == 50061 and args.metrics_port == 9461
                parsed.append(c["name"])
        for c in _containers(docs, "gateway"):
            if "command" not in c:
                args = _parse(gateway_parser, ["gateway", *c["args"]])
                assert args.host == "0.0.0.0"
                parsed.append(c["name"])
    assert {"license-server", "gateway"} <= set(parsed)


def test_config_files_load_and_name_mounted_paths(tmp_path):
    from gateway.service import GatewayConfig
    from handlers.server import read_config

    for target in ["small", "small+kserve"]:
        docs = render(target)
        for name, data in _config_map(docs, "gateway-config")["data"].items():
            path = tmp_path / name
            path.write_text(data)
            config = GatewayConfig.from_json(path)
            assert config.license_server == "license-server:50061" and config.models
        ts = _config_map(docs, "torchserve-config")["data"]
        (tmp_path / "config.properties").write_text(ts["config.properties"])
        props = read_config(tmp_path / "config.properties")
        assert props["metrics_mode"] == "prometheus" and props["disable_token_authorization"] == "true"
        assert props["management_address"].startswith("http://127.0.0.1:")
        assert props["grpc_management_address"] == "127.0.0.1"
        assert props["inference_address"] == "http://0.0.0.0:8080" and props["metrics_address"] == "http://0.0.0.0:8082"
    # the handler fetches revocations itself (--revocation-server): TorchServe is the pod's one container
    pod = _pod_spec(render("small"), "Deployment", "torchserve")
    assert [c["name"] for c in pod["containers"]] == ["torchserve"]
    assert _arg(_container(pod, "torchserve"), "--model-store") == props["model_store"]


@pytest.mark.parametrize("target", ["small", "production", "small+kserve"])
def test_paths_in_arguments_are_mounted(target):
    prefixes = ("/etc/activeguard/", "/run/activeguard/", "/var/lib/activeguard/", "/srv/")
    docs = render(target)
    # KServe merges an InferenceService's model container (its volume mounts) into its runtime's container
    by_runtime = {
        d["spec"]["predictor"]["model"]["runtime"]: d["spec"]["predictor"]["model"].get("volumeMounts", [])
        for d in docs
        if d["kind"] == "InferenceService"
    }
    for doc in docs:
        for where, _, containers in _pods(doc):
            for c in containers:
                merged = by_runtime.get(doc["metadata"]["name"], []) if doc["kind"] == "ServingRuntime" else []
                mounts = [m["mountPath"] for m in c.get("volumeMounts", []) + merged]
                for token in c.get("command", []) + c.get("args", []):
                    path = token.split("=", 1)[-1]
                    if path.startswith(prefixes) or path in {p.rstrip("/") for p in prefixes}:
                        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
                            f"{where} container {c['name']}: {path} is on no volume mount {mounts}"
                        )


@pytest.mark.parametrize("target", ["small", "production", "small+kserve"])
def test_probes_mean_ready(target):
    docs = render(target)
    for doc in docs:
        for where, _, containers in _pods(doc):
            for c in containers:
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    get = c.get(probe, {}).get("httpGet", {})
                    assert get.get("path") != "/ping", f"{where}/{c['name']}: TorchServe's /ping is ready too early"
    for name, port in [("license-server", 50061), ("gateway", 50071)]:
        server = _container(_pod_spec(docs, "Deployment", name), name)
        for probe in ("readinessProbe", "livenessProbe"):
            assert server[probe]["grpc"]["port"] == port, f"{name} {probe} must be a grpc.health.v1 probe"
    torchserve = [c for c in _containers(docs, "torchserve")]
    assert torchserve
    for c in torchserve:
        for probe in ("readinessProbe", "livenessProbe") if "livenessProbe" in c else ("readinessProbe",):
            script = " ".join(c[probe]["exec"]["command"])
            assert "127.0.0.1:8081/models/" in script and "'READY'" in script


# -- images ------------------------------------------------------------------------------------------


@functools.cache
def _dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Each build stage: the stage (or image) it is built from, its last USER and ENTRYPOINT, its lines."""
    stages: dict[str, dict[str, Any]] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", line, re.IGNORECASE)
        if m:
            parent = stages.get(m[1], {})
            current = stages[m[2]] = {
                "from": m[1],
                "user": parent.get("user"),
                "entrypoint": parent.get("entrypoint"),
                "lines": [],
            }
            continue
        if current is None:
            continue
        current["lines"].append(line)
        m = re.match(r"^(USER|ENTRYPOINT)\s+(.+)$", line)
        if m:
            current[m[1].lower()] = m[2].strip()
    return stages


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_image_has_a_build_stage(target):
    stages = _dockerfile_stages()
    for doc in render(target):
        for image in _images(doc):
            m = IMAGE.match(image)
            assert m, (
                f"{doc['kind']}/{doc['metadata']['name']}: image {image!r} is not [REGISTRY/]activeguard/<stage>[:TAG]"
            )
            assert m["stage"] in stages and not m["stage"].startswith("_"), (
                f"image {image!r}: deploy/docker/Dockerfile has no stage {m['stage']!r}"
            )


def test_every_public_stage_is_used_and_runs_unprivileged():
    stages = _dockerfile_stages()
    named = {IMAGE.match(i)["stage"] for t in TARGETS for d in render(t) for i in _images(d)}
    public = {s for s in stages if not s.startswith("_")}
    assert public == named, f"stages no manifest names: {public - named}; images without a stage: {named - public}"
    for stage in public:
        user = stages[stage]["user"]
        assert user and user.split(":")[0] not in {"0", "root"}, f"stage {stage} runs as {user!r}"


def test_images_install_torch_first_then_the_pinned_project():
    text = DOCKERFILE.read_text()
    torch = text.index("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0")
    project = text.index('--constraint /tmp/constraints.txt "/src[license-server,serving]"')
    assert torch < project
    assert "openjdk-17-jre-headless" in "\n".join(_dockerfile_stages()["torchserve"]["lines"])
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert pins["torch"] == "2.13.0"
    from importlib.metadata import requires

    needed = {
        re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]
        for r in requires("activeguard") or []
        if "extra ==" not in r or any(f'extra == "{e}"' in r for e in ("serving", "license-server", "grpc"))
    }
    missing = {n for n in needed if re.sub(r"[-_.]+", "-", n).lower() not in pins and n != "activeguard"}
    assert not missing, f"constraints.txt pins none of {sorted(missing)}"


# -- secrets and security ----------------------------------------------------------------------------


def test_secrets_hold_only_placeholders_and_live_outside_the_overlays():
    for target in TARGETS:
        for doc in render(target):
            if doc["kind"] != "Secret":
                continue
            assert target == "secrets", (
                f"{target} carries Secret {doc['metadata']['name']}: `kubectl apply -k` would overwrite the real one"
            )
            values = list(doc.get("stringData", {}).values())
            values += [base64.b64decode(v).decode() for v in doc.get("data", {}).values()]
            assert values and all(PLACEHOLDER in v for v in values), (
                f"Secret {doc['metadata']['name']} holds a value that is not a {PLACEHOLDER} placeholder"
            )
    referenced = set()
    for doc in render("small") + render("production"):
        text = json.dumps(doc, sort_keys=True)
        referenced |= set(re.findall(r'"secretName": "([^"]+)"', text))
        referenced |= set(re.findall(r'"secretKeyRef": \{"key": "[^"]+", "name": "([^"]+)"', text))
    assert {"license-server-keys", "license-server-database", "gateway-keys"} <= referenced
    templates = {d["metadata"]["name"] for d in render("secrets")}
    assert referenced <= templates, f"Secrets used but missing from deploy/kubernetes/secrets: {referenced - templates}"


SECRET_PATTERNS = {
    "a PEM private key": re.compile(r"BEGIN [A-Z ]*PRIVATE KEY"),
    "an admin token": re.compile(r"\bagt_[A-Za-z0-9_-]{16,}"),
    "a URL with a password": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@\"']+:[^\s/@\"']+@"),
}
# environment variables and config keys that would hold a secret: from a Secret (env), or a file path (config)
SECRET_ENV = re.compile(r"token|passw|passphrase|secret|private|^ACTIVEGUARD_LICENSE_DB$", re.IGNORECASE)
SECRET_KEYS = re.compile(r"token|passw|passphrase|secret|private|key|database|dsn", re.IGNORECASE)


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "secrets"])
def test_no_key_or_token_outside_secrets(target):
    for doc in render(target):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        text = yaml.safe_dump(doc)
        for what, pattern in SECRET_PATTERNS.items():
            assert not pattern.search(text), f"{where} carries {what}"
        for _, _, containers in _pods(doc):
            for c in containers:
                for env in c.get("env", []):
                    if SECRET_ENV.search(env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), (
                            f"{where}: env {env['name']} not from a Secret"
                        )
        if doc["kind"] == "ConfigMap":
            for name, data in doc["data"].items():
                pairs = re.findall(r'"(\w+)"\s*:\s*"([^"]*)"', data) + re.findall(r"^(\w+)\s*=\s*(.*)$", data, re.M)
                for key, value in pairs:
                    if SECRET_KEYS.search(key) and not re.fullmatch(r"true|false|\d+", value):
                        assert value.startswith("/"), f"{where} {name}: {key} holds a value, not a file path"


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_pod_runs_as_non_root(target):
    for doc in render(target):
        for where, pod, containers in _pods(doc):
            pod_ctx = pod.get("securityContext", {})
            if doc["kind"] != "ServingRuntime":
                assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
            for c in containers:
                ctx = c.get("securityContext", {})
                name = f"{where} container {c.get('name', 'model')}"
                assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot"
                assert (ctx.get("runAsUser") or pod_ctx.get("runAsUser") or 0) > 0, f"{name}: runAsUser"
                assert ctx.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
                assert ctx.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
                assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{name}: capabilities.drop ALL"
                assert not ctx.get("privileged"), f"{name}: privileged"


# -- network policies --------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "these checks read matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ingress_peers(docs: list[dict[str, Any]], labels: dict[str, str], port: int) -> list[Any]:
    """Every peer admitted to ``port`` of pods with ``labels`` (``"anyone"`` for a rule without ``from``)."""
    peers: list[Any] = []
    for policy in docs:
        if policy["kind"] != "NetworkPolicy" or not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers.extend(rule.get("from", ["anyone"]))
    return peers


def _egress_peers(docs: list[dict[str, Any]], labels: dict[str, str], port: int) -> list[Any]:
    """Every peer pods with ``labels`` may reach on ``port`` (``"anyone"`` for a rule without ``to``)."""
    peers: list[Any] = []
    for policy in docs:
        if policy["kind"] != "NetworkPolicy" or not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("egress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers.extend(rule.get("to", ["anyone"]))
    return peers


def test_handlers_reach_the_license_server_for_revocations():
    """Each handler fetches the signed revocation list itself (--revocation-server license-server:50061):
    TorchServe's pods, and KServe's predictor pods, may reach the license server's gRPC port, and it them."""
    license_server = {"app.kubernetes.io/name": "license-server"}
    for target, labels, peer in [
        ("small", {"app.kubernetes.io/name": "torchserve"}, _pod("torchserve")),
        ("production", {"app.kubernetes.io/name": "torchserve"}, _pod("torchserve")),
        (
            "small+kserve",
            {"serving.kserve.io/inferenceservice": "activeguard"},
            {"podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": "activeguard"}}},
        ),
    ]:
        docs = render(target)
        assert _egress_peers(docs, labels, 50061) == [_pod("license-server")], target
        assert peer in _ingress_peers(docs, license_server, 50061), target
        properties = _config_map(docs, "torchserve-config")["data"]
        assert "revocation-sync.json" not in properties, "the revocation-sync sidecar's config is gone"
    assert "--revocation-server license-server:50061" in OPERATIONS.read_text()


def _pod(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}


@pytest.mark.parametrize("target", OVERLAYS + ["production+direct-access"])
def test_network_policies_admit_only_the_documented_peers(target):
    docs = render(target)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ), "no default-deny policy"
    license_server = {"app.kubernetes.io/name": "license-server"}
    ops_pods = {"podSelector": {"matchLabels": {"activeguard.io/role": "ops"}}}
    assert sorted(map(json.dumps, _ingress_peers(docs, license_server, 50061))) == sorted(
        map(json.dumps, [_pod("gateway"), _pod("torchserve"), ops_pods, OPS_NAMESPACE])
    )
    torchserve = {"app.kubernetes.io/name": "torchserve"}
    for port in (8080, 7070):
        expected = [_pod("gateway")] + (["anyone"] if target.endswith("direct-access") else [])
        assert _ingress_peers(docs, torchserve, port) == expected, f"TorchServe :{port}"
    for port in (8081, 7071):
        assert _ingress_peers(docs, torchserve, port) == [], f"TorchServe's management port {port} is open"
    for labels, port in [
        (license_server, 9462),
        ({"app.kubernetes.io/name": "gateway"}, 9471),
        (torchserve, 8082),
    ]:
        assert _ingress_peers(docs, labels, port) == [MONITORING_NAMESPACE], f"metrics port {port}"
    assert _ingress_peers(docs, {"app.kubernetes.io/name": "gateway"}, 50071) == ["anyone"]


# -- monitoring ----------------------------------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"} and doc["groups"]
    rules = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"], "every group has a name and rules"
        rules.extend(group["rules"])
    return rules


def test_alert_rules_are_complete():
    rules = _alert_rules()
    names = [r.get("alert") for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    operations = OPERATIONS.read_text()
    for rule in rules:
        assert rule.get("alert") and isinstance(rule.get("expr"), str) and rule["expr"].strip(), rule
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, rule["alert"]
        assert rule.get("annotations", {}).get("summary") and rule["annotations"].get("description"), rule["alert"]
        assert rule["alert"] in operations, f"docs/operations.md does not say what to do for {rule['alert']}"


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        exprs.extend(t["expr"] for t in panel["targets"])
    return exprs


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
SYNTHETIC = {"up"}  # made by Prometheus, not scraped from a server
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names or label values."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", expr):
        if not m[2] and m[1] not in PROMQL_WORDS:
            names.add(m[1])
    return names


def test_metric_names_extracted_from_promql():
    expr = 'histogram_quantile(0.9, sum by (le, path) (rate(a_seconds_bucket{code=~"X|Y"}[5m]))) > 0.2 * sum(b) and on (model) c'
    assert metric_names(expr) == {"a_seconds_bucket", "b", "c"}


def test_metrics_list_matches_alerts_and_dashboard():
    listed = (MONITORING / "metrics.txt").read_text().splitlines()
    assert listed and all(re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", n) for n in listed), "one metric name per line"
    assert len(listed) == len(set(listed))
    used: dict[str, str] = {}
    sources = [("alerts.yaml", r["expr"]) for r in _alert_rules()] + [("dashboard.json", e) for e in _dashboard_exprs()]
    for source, expr in sources:
        for name in metric_names(expr) - SYNTHETIC:
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            used.setdefault(base if base in listed else name, source)
    assert not set(used) - set(listed), (
        f"used but not in metrics.txt: { {n: used[n] for n in set(used) - set(listed)} }"
    )
    assert not set(listed) - set(used), f"in metrics.txt but used nowhere: {sorted(set(listed) - set(used))}"
    assert "up" in {n for r in _alert_rules() for n in metric_names(r["expr"])}, "no alert reads up{job=...}"


def test_operations_doc_covers_secrets_and_what_was_not_validated():
    text = OPERATIONS.read_text()
    assert re.search(r"kubectl (-n \S+ )?create secret generic", text), "docs/operations.md: how to create the Secrets"
    for needle in ("not validated", "metrics.txt", "overlays/small", "overlays/production", "components/kserve"):
        assert needle in text, f"docs/operations.md does not mention {needle!r}"
