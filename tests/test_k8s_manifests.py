"""The Kubernetes manifests of deploy/k8s: rendered as ``kubectl kustomize`` would, every object valid against the
Kubernetes schemas (``kubernetes-validate``, offline, strict: an unknown field is an error), and the contracts the
rest of slmops relies on: probe paths the servers answer, the PodDisruptionBudget and Services selecting the pods
they mean, the database URL from a Secret, both edge containers on one store, memory sized from the measured RSS.

kustomize itself is not installed here (a Go binary; no pure-Python kustomize exists on PyPI), so :func:`render`
implements the subset the tree uses (``resources`` as files or folders, ``namespace``, ``labels`` without
selectors, ``images``) and refuses any other key, so a kustomization that grows a feature fails here until the
renderer learns it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).parents[1]
ROOT = REPO / "deploy" / "k8s"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest release still maintained by some vendors, and the latest
K8S_VERSION = K8S_VERSIONS[-1]
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "labels", "images"}
CLUSTER_SCOPED = {"Namespace"}
# Peak RSS of `slmops serve` and its runner with smollm2:135m Q4_1, default KV budget and prefix cache, 8 parallel
# sequences (docs/benchmarks.md, S5), and what the server process alone holds (the S4 notes there).
MEASURED_PEAK_MB = 1202
SERVER_ALONE_MB = 85
MIB = 1024 * 1024


def render(folder: Path, seen: frozenset[Path] = frozenset()) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize folder`` gives, for the features this tree uses."""
    assert folder not in seen, f"kustomization cycle through {folder}"
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_KEYS
    assert not unknown, f"{folder}: the test's renderer does not know {sorted(unknown)}"
    assert spec["kind"] == "Kustomization" and spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        assert path.is_relative_to(ROOT), f"{entry} leaves deploy/k8s"
        if path.is_dir():
            objects += render(path, seen | {folder})
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o is not None]
    for obj in objects:
        if "namespace" in spec and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = spec["namespace"]
        for group in spec.get("labels", []):
            assert group.get("includeSelectors", False) is False, "selector labels are not rendered here"
            obj["metadata"].setdefault("labels", {}).update(group["pairs"])
            template = obj.get("spec", {}).get("template")
            if template is not None and group.get("includeTemplates", False):
                template["metadata"].setdefault("labels", {}).update(group["pairs"])
        for image in spec.get("images", []):
            for container in containers(obj, init=True):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objects


def containers(obj: dict[str, Any], init: bool = False) -> Iterator[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("containers", [])
    if init:
        yield from pod.get("initContainers", [])


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(ROOT)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in objects])
    return found[0]


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (binary and decimal suffixes)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert m, text
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}[m.group(2)]
    return int(m.group(1)) * scale


# -- the schemas -------------------------------------------------------------------------------------------------

def test_every_object_is_valid_kubernetes(objects: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [("ConfigMap", "slmops-control"), ("ConfigMap", "slmops-edge"),
                     ("DaemonSet", "slmops-edge"), ("Deployment", "slmops-control"), ("Namespace", "slmops"),
                     ("PodDisruptionBudget", "slmops-control"), ("Service", "slmops-control"),
                     ("Service", "slmops-control-pods"), ("Service", "slmops-edge"), ("Service", "slmops-edge-pods")]
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "slmops"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "slmops"


def test_the_validation_catches_mistakes(objects: list[dict[str, Any]]) -> None:
    """The schema check is real: a misspelt field and a wrong type are refused."""
    deployment = copy.deepcopy(one(objects, "Deployment", "slmops-control"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    daemonset = copy.deepcopy(one(objects, "DaemonSet", "slmops-edge"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)


def test_images_come_from_the_kustomization(objects: list[dict[str, Any]]) -> None:
    images = {c["name"]: c["image"] for o in objects for c in containers(o, init=True)}
    assert images == {"control": "slmops-control:0.1.0", "serve": "slmops:0.1.0", "agent": "slmops:0.1.0",
                      "store-owner": "slmops:0.1.0"}


# -- the control plane -----------------------------------------------------------------------------------------

def test_control_plane_replicas_probes_database_and_budget(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment", "slmops-control")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    (control,) = spec["template"]["spec"]["containers"]
    assert control["args"] == ["fleet", "serve"]
    port = {p["name"]: p["containerPort"] for p in control["ports"]}["http"]
    assert port == 11500
    assert control["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert control["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert control["startupProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in control["env"]}
    assert env["SLMOPS_FLEET_DB"]["valueFrom"] == {"secretKeyRef": {"name": "slmops-control-db", "key": "url"}}
    assert "value" not in env["SLMOPS_FLEET_DB"]
    config = one(objects, "ConfigMap", "slmops-control")
    assert {"configMapRef": {"name": "slmops-control"}} in control["envFrom"]
    host, _, bound = config["data"]["SLMOPS_FLEET_HOST"].rpartition(":")
    assert host == "0.0.0.0" and int(bound) == port  # the probes reach the pod's address
    assert not [o for o in objects if o["kind"] == "Secret"]  # the database password is not in the repository

    pdb = one(objects, "PodDisruptionBudget", "slmops-control")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]  # a drain can still move one replica
    for name in ("slmops-control", "slmops-control-pods"):
        service = one(objects, "Service", name)
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert one(objects, "Service", "slmops-control-pods")["spec"]["clusterIP"] == "None"  # Prometheus' DNS SD


def non_root(obj: dict[str, Any]) -> None:
    pod = obj["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for c in containers(obj):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert c["resources"]["limits"]["memory"]  # every container is bounded


def test_pods_run_unprivileged(objects: list[dict[str, Any]]) -> None:
    non_root(one(objects, "Deployment", "slmops-control"))
    edge = one(objects, "DaemonSet", "slmops-edge")
    non_root(edge)
    (init,) = edge["spec"]["template"]["spec"]["initContainers"]  # the one root step: chown of the hostPath
    assert init["command"][0] == "chown" and init["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                                                          "add": ["CHOWN"]}


# -- the edge nodes ----------------------------------------------------------------------------------------------

def test_edge_pod_runs_serve_and_agent_on_one_store(objects: list[dict[str, Any]]) -> None:
    edge = one(objects, "DaemonSet", "slmops-edge")
    pod = edge["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    assert set(by_name) == {"serve", "agent"}
    serve, agent = by_name["serve"], by_name["agent"]
    assert serve["args"] == ["serve"]
    assert "exec slmops agent run" in agent["args"][0] and "slmops agent enrol" in agent["args"][0]

    def env(c: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}

    mounts = {name: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for name, c in by_name.items()}
    home = env(serve)["SLMOPS_HOME"]
    assert env(agent)["SLMOPS_HOME"] == home  # the agent changes models through the server's store
    assert mounts["serve"]["store"] == mounts["agent"]["store"] == home
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "hostPath" in volumes["store"] or "persistentVolumeClaim" in volumes["store"]

    port = {p["name"]: p["containerPort"] for p in serve["ports"]}["http"]
    assert env(serve)["SLMOPS_HOST"] == f"0.0.0.0:{port}"  # probes and Prometheus reach the pod's address
    assert env(agent)["SLMOPS_HOST"] == f"127.0.0.1:{port}"  # the agent talks to its own pod's server
    assert serve["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert serve["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert env(agent)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "$NODE_NAME" in agent["args"][0] and mounts["agent"]["enrol"] == "/etc/slmops/enrol"
    assert volumes["enrol"]["secret"] == {"secretName": "slmops-enrol-tokens", "optional": True,
                                          "defaultMode": 0o440}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # tokens readable

    edge_config = one(objects, "ConfigMap", "slmops-edge")["data"]
    control = one(objects, "Service", "slmops-control")
    host, _, port_text = edge_config["SLMOPS_FLEET_HOST"].rpartition(":")
    assert host.split(".")[:2] == [control["metadata"]["name"], control["metadata"]["namespace"]]
    assert int(port_text) == control["spec"]["ports"][0]["port"]

    pod_labels = edge["spec"]["template"]["metadata"]["labels"]
    assert edge["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for name in ("slmops-edge", "slmops-edge-pods"):
        assert one(objects, "Service", name)["spec"]["selector"].items() <= pod_labels.items()
    assert one(objects, "Service", "slmops-edge")["spec"]["internalTrafficPolicy"] == "Local"


def test_edge_memory_is_sized_from_the_measured_model(objects: list[dict[str, Any]]) -> None:
    measured = "".join(p.read_text() for p in (REPO / "README.md", REPO / "docs" / "benchmarks.md") if p.exists())
    assert f"| S5 peak RSS (server and runners), MB | {MEASURED_PEAK_MB} |" in measured, \
        "the measured figure cited here is not the benchmarks' any more"
    serve = next(c for c in containers(one(objects, "DaemonSet", "slmops-edge")) if c["name"] == "serve")
    request = quantity(serve["resources"]["requests"]["memory"])
    limit = quantity(serve["resources"]["limits"]["memory"])
    runner = MEASURED_PEAK_MB - SERVER_ALONE_MB
    assert request >= MEASURED_PEAK_MB * 10**6  # steady state: one release loaded
    assert limit >= (SERVER_ALONE_MB + 2 * runner) * 10**6  # a switch: the previous release stays loaded beside it
    assert limit >= request
    threads = next(e for e in serve["env"] if e["name"] == "SLMOPS_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": "serve", "resource": "limits.cpu", "divisor": "1"}
    assert serve["resources"]["limits"]["cpu"]
    sizing = (ROOT / "edge" / "daemonset.yaml").read_text()
    assert f"{MEASURED_PEAK_MB:,} MB" in sizing  # the manifest cites the figure it is sized from
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"{MEASURED_PEAK_MB:,} MB" in docs and f"{limit // MIB}Mi" in docs
