"""The Kubernetes manifests (deploy/k8s), rendered with `kubectl kustomize` and checked offline: every object
against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail), then our own rules.

Kubernetes versions: 1.27 is the oldest we support (native gRPC probes are GA there), and the newest schema
kubernetes-validate ships catches removed APIs. The ServiceMonitor is a CRD with no schema in that package:
it is checked against SERVICE_MONITOR_SCHEMA below, a strict subset of the monitoring.coreos.com/v1 CRD
covering the fields we use (a typo in them fails), and against the Service it selects.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from service.config import config_schema, load_config
from service.server import GENERATION
from tests.conftest import ROOT
from tests.deploy.manifests import (
    K8S,
    Obj,
    Rendered,
    all_containers,
    container,
    load_yaml,
    pod_spec,
    port_number,
    selects,
    workloads,
)

OLDEST_K8S = "1.27"
CRD_KINDS = {"ServiceMonitor"}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}


def _k8s_versions() -> list[str]:
    return [OLDEST_K8S, kubernetes_validate.utils.latest_version()]


def test_every_target_renders(rendered: dict[str, Rendered]) -> None:
    assert {"overlays/dev", "overlays/prod", "jobs/convert-models"} <= set(rendered)
    for r in rendered.values():
        assert r.objects, f"{r.name} rendered nothing"


@pytest.mark.parametrize("version", _k8s_versions())
def test_every_object_is_valid_for_kubernetes(rendered: dict[str, Rendered], version: str) -> None:
    checked = 0
    for r in rendered.values():
        for obj in r.objects:
            if obj["kind"] in CRD_KINDS:
                continue  # no schema in kubernetes-validate: see test_service_monitor_scrapes_the_pods
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                pytest.fail(f"{r.name}: {obj['kind']}/{obj['metadata']['name']} at {path}: {err.message}")
            checked += 1
    assert checked >= 15


def test_strict_validation_rejects_a_misspelt_field(rendered: dict[str, Rendered]) -> None:
    deployment = copy.deepcopy(rendered["overlays/dev"].deployment())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_K8S, strict=True)


def test_service_monitor_scrapes_the_pods(overlays: list[Rendered]) -> None:
    for r in overlays:
        monitor = r.one("ServiceMonitor", "sluice")
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
        selected = [s for s in r.of_kind("Service")
                    if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        # Exactly one Service, or every pod is scraped once per matching Service.
        assert [s["metadata"]["name"] for s in selected] == ["sluice-headless"], r.name
        (endpoint,) = monitor["spec"]["endpoints"]
        service_ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
        assert endpoint["port"] in service_ports
        assert service_ports[endpoint["port"]]["targetPort"] == "metrics"
        assert port_number(r.server_container(), "metrics") == int(r.config()["SLUICE_METRICS_PORT"])


def _grpc_probe_checks(r: Rendered, name: str, probe: Obj, grpc_port: int) -> str:
    """Checks one probe; returns the health service it asks about."""
    if "grpc" in probe:
        assert probe["grpc"]["port"] == grpc_port, f"{r.name} {name}: not the gRPC port"
        return str(probe["grpc"].get("service", ""))
    # prod: TLS on the gRPC port, so the probe runs the TLS health check script (see the overlay).
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "/etc/sluice/probe/grpc_health_tls.py"], f"{r.name} {name}: {command}"
    assert int(command[4]) == grpc_port, f"{r.name} {name}: not the gRPC port"
    return str(command[2])


def test_probes_ask_grpc_health_on_the_grpc_port(overlays: list[Rendered]) -> None:
    for r in overlays:
        c = r.server_container()
        grpc_port = port_number(c, "grpc")
        assert grpc_port == int(r.config()["SLUICE_PORT"])
        services = {name: _grpc_probe_checks(r, name, c[name], grpc_port)
                    for name in ("startupProbe", "readinessProbe", "livenessProbe")}
        # Readiness follows the generation service; startup and liveness the overall status.
        assert services == {"startupProbe": "", "readinessProbe": GENERATION, "livenessProbe": ""}, r.name
        startup, liveness = c["startupProbe"], c["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "too little time for a model load"
        # A draining pod reports NOT_SERVING; liveness must not restart it before the drain is over.
        grace = pod_spec(r.deployment())["terminationGracePeriodSeconds"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, r.name
        assert liveness["timeoutSeconds"] >= 2, r.name


def test_prod_probe_script_is_mounted(rendered: dict[str, Rendered]) -> None:
    r = rendered["overlays/prod"]
    spec = pod_spec(r.deployment())
    (volume,) = [v for v in spec["volumes"] if v["name"] == "probe"]
    script = r.one("ConfigMap", volume["configMap"]["name"])
    assert "grpc_health_tls.py" in script["data"]
    mounts = {m["mountPath"]: m["name"] for m in r.server_container()["volumeMounts"]}
    assert mounts["/etc/sluice/probe"] == "probe"
    assert mounts["/etc/sluice/tls"] == "tls"
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "sluice-tls"
    config = r.config()
    assert config["SLUICE_TLS_CERT"].startswith("/etc/sluice/tls/")
    assert config["SLUICE_TLS_KEY"].startswith("/etc/sluice/tls/")


def test_drain_fits_in_the_termination_grace(overlays: list[Rendered]) -> None:
    for r in overlays:
        spec = pod_spec(r.deployment())
        pre_stop = r.server_container()["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        drain = float(pre_stop[1]) + float(r.config()["SLUICE_GRACE_SECONDS"])
        # 5 s for the final stop after the drain grace.
        assert spec["terminationGracePeriodSeconds"] >= drain + 5, r.name
        # The kubelet would inject SLUICE_PORT=tcp://... for the Service named "sluice".
        assert spec["enableServiceLinks"] is False


def test_every_container_has_requests_and_limits(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for w in workloads(r):
            for c in all_containers(w):
                res = c["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res[kind]), f"{r.name} {c['name']} {kind}"
    for r in rendered.values():
        if not r.name.startswith("overlays/"):
            continue
        res = r.server_container()["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"], "a memory request below the limit invites OOM"
        # onnxruntime's threads match the CPU quota (its default counts the node's cores).
        assert int(r.config()["SLUICE_INTRA_OP_THREADS"]) == int(res["limits"]["cpu"])


def _check_container_security(where: str, c: Obj) -> None:
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"]["drop"] == ["ALL"], where
    assert sc.get("runAsNonRoot", True) is True, where


def test_pods_run_as_non_root_with_a_read_only_root(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for w in workloads(r):
            spec = pod_spec(w)
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, r.name
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", r.name
            assert spec["automountServiceAccountToken"] is False, r.name
            tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            for c in all_containers(w):
                _check_container_security(f"{r.name} {c['name']}", c)
            for c in spec["containers"]:
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in tmp_volumes, f"{r.name} {c['name']}: no writable /tmp"


def test_images_are_pinned(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for w in workloads(r):
            for c in all_containers(w):
                image = c["image"]
                assert "/" in image, f"{r.name} {c['name']}: {image} was not rewritten by the overlay's images"
                assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image), f"{r.name}: {image} has no tag"
                assert not image.endswith(":latest"), f"{r.name}: {image}"


def test_services_headless_and_clusterip_select_the_pods(overlays: list[Rendered]) -> None:
    for r in overlays:
        pod_labels = r.deployment()["spec"]["template"]["metadata"]["labels"]
        container_ports = {p["name"] for p in r.server_container()["ports"]}
        services = {s["metadata"]["name"]: s["spec"] for s in r.of_kind("Service")}
        assert services["sluice-headless"]["clusterIP"] == "None", "client-side balancing needs the pod IPs"
        assert services["sluice"].get("clusterIP") != "None"
        for spec in services.values():
            assert selects(spec["selector"], pod_labels), r.name
            assert {p["targetPort"] for p in spec["ports"]} <= container_ports
            assert "grpc" in {p["name"] for p in spec["ports"]}
        # Connections are recycled, so a scale-out gets traffic from clients already connected.
        assert float(r.config()["SLUICE_MAX_CONNECTION_AGE_SECONDS"]) > 0


def test_hpa_scales_the_deployment_on_cpu_and_queue(overlays: list[Rendered]) -> None:
    adapter = load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    adapted = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    exported = (ROOT / "service" / "metrics.py").read_text()
    for r in overlays:
        hpa = r.one("HorizontalPodAutoscaler", "sluice")["spec"]
        deployment = r.deployment()
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": deployment["metadata"]["name"]}
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        kinds = {m["type"]: m for m in hpa["metrics"]}
        assert kinds["Resource"]["resource"]["name"] == "cpu"
        queue = kinds["Pods"]["pods"]["metric"]["name"]
        assert queue == "sluice_requests_waiting"
        assert queue in adapted, "prometheus-adapter must expose the metric the HPA reads"
        assert f'"{queue}"' in exported, "the server must export it (service/metrics.py)"


def test_pdb_and_network_policy_cover_the_pods(overlays: list[Rendered]) -> None:
    for r in overlays:
        pod_labels = r.deployment()["spec"]["template"]["metadata"]["labels"]
        pdb = r.one("PodDisruptionBudget", "sluice")["spec"]
        assert selects(pdb["selector"]["matchLabels"], pod_labels)
        policy = r.one("NetworkPolicy", "sluice")["spec"]
        assert selects(policy["podSelector"]["matchLabels"], pod_labels)
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
        assert set(by_port) == {"grpc", "metrics"}
        assert [f["podSelector"]["matchLabels"] for f in by_port["grpc"]] == [{"sluice-client": "true"}]
        (prometheus,) = by_port["metrics"]
        assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
        assert "namespaceSelector" in prometheus


def test_config_keys_exist_in_the_service_schema(overlays: list[Rendered]) -> None:
    schema = config_schema().values()
    known = {s.env for s in schema}
    env_only = {s.env for s in schema if s.flag is None}
    for r in overlays:
        config = r.config()
        unknown = sorted(set(config) - known)
        assert not unknown, f"{r.name}: not in service.config.config_schema(): {unknown}"
        assert not set(config) & env_only, "secrets come from a Secret, never the ConfigMap"
        env = r.server_container()["env"]
        assert {e["name"] for e in env} <= known
        (token,) = [e for e in env if e["name"] == "SLUICE_AUTH_TOKEN"]
        assert "secretKeyRef" in token["valueFrom"]
        # The values parse and pass the server's own checks (types, bounds, cross-field rules).
        loaded = load_config([], {**config, "SLUICE_AUTH_TOKEN": "x" * 32})
        assert loaded.server.host == "0.0.0.0"


def test_config_schema_check_catches_a_typo(rendered: dict[str, Rendered]) -> None:
    known = {s.env for s in config_schema().values()}
    typo = {**rendered["overlays/dev"].config(), "SLUICE_MAX_SLOT": "8"}
    assert set(typo) - known == {"SLUICE_MAX_SLOT"}


def test_dev_bakes_the_model_into_the_image(rendered: dict[str, Rendered]) -> None:
    r = rendered["overlays/dev"]
    assert not r.config()["SLUICE_MODEL"].startswith("/"), "relative to the image's WORKDIR"
    assert not r.of_kind("PersistentVolumeClaim")
    assert r.one("Secret", "sluice-auth")["data"]["token"]


def test_prod_serves_llama_with_llama_guard_from_a_read_only_pvc(rendered: dict[str, Rendered]) -> None:
    r = rendered["overlays/prod"]
    config = r.config()
    assert config["SLUICE_GUARD_BACKEND"] in ("llama_guard", "cascade")
    assert "llama-3.2-1b-instruct" in config["SLUICE_MODEL"]
    assert "llama-guard-3-1b" in config["SLUICE_GUARD_MODEL"]
    spec = pod_spec(r.deployment())
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    claim = models["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert r.one("PersistentVolumeClaim", claim["claimName"])
    for c in all_containers(r.deployment()):
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
        assert mount["readOnly"] is True
        assert config["SLUICE_MODEL"].startswith(mount["mountPath"] + "/")
        assert config["SLUICE_GUARD_MODEL"].startswith(mount["mountPath"] + "/")
    assert not r.of_kind("Secret"), "prod Secrets are created outside the repository"
    # The conversion Job writes exactly the folders the server reads, on the same claim.
    job = rendered["jobs/convert-models"].one("Job", "sluice-convert-models")
    outs = {c["args"][c["args"].index("--out") + 1] for c in all_containers(job)}
    assert outs == {config["SLUICE_MODEL"], config["SLUICE_GUARD_MODEL"]}
    assert all(c["command"] == ["python", "-m", "tools.convert_gguf"] for c in all_containers(job))
    (job_claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]
                    if "persistentVolumeClaim" in v]
    assert job_claim == claim["claimName"]
    assert container(job, "convert-guard")["image"].endswith("-converter")
