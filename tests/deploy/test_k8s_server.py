"""The server started the way the Deployment starts it, and the Deployment's own probes run against it.

The command, args and environment come from the rendered dev overlay: the container's command line, the
ConfigMap's SLUICE_* variables and the token from the Secret. The only changes are the two ports (free
ones, since other processes share this machine) and `python` -> this interpreter. The model path in the
ConfigMap is relative to the image's WORKDIR; the repository root has the same layout (`make model`).

The prod overlay serves TLS, which the kubelet's gRPC probe cannot speak; its exec probes run
deploy/k8s/overlays/prod/grpc_health_tls.py, checked here against a TLS server with a throwaway certificate.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT
from tests.deploy.manifests import K8S, Obj, Rendered, pod_spec

SERVING = health_pb2.HealthCheckResponse.SERVING
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_SCRIPT = K8S / "overlays" / "prod" / "grpc_health_tls.py"
# What a build without the embedded classifier says; the test then cannot run the ConfigMap as written.
NO_CLASSIFIER = "classifier is not available in this build"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _container_env(r: Rendered) -> dict[str, str]:
    """The container's SLUICE_* environment: the ConfigMap, then `env` entries (Secrets resolved)."""
    env = r.config()
    for entry in r.server_container().get("env", []):
        ref = entry["valueFrom"]["secretKeyRef"]
        secret = r.one("Secret", ref["name"])
        env[entry["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


@contextmanager
def _serve(command: list[str], sluice_env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")} | sluice_env
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _wait_serving(proc: subprocess.Popen[bytes], channel: grpc.Channel, budget: float, log: Path) -> float:
    """Blocks on the health Watch stream until the overall status is SERVING; returns the seconds it took.

    A watcher thread closes the channel if the process exits first, which ends the stream at once.
    """
    def close_on_exit() -> None:
        proc.wait()
        channel.close()

    threading.Thread(target=close_on_exit, daemon=True).start()
    start = time.monotonic()
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=budget)
    try:
        for reply in stream:
            if reply.status == SERVING:
                stream.cancel()
                return time.monotonic() - start
    except grpc.RpcError:
        pass
    text = log.read_text(errors="replace")
    if NO_CLASSIFIER in text:
        pytest.skip(f"the ConfigMap's guard backend is not built yet ({NO_CLASSIFIER})")
    pytest.fail(f"server not SERVING within {budget:.0f}s (exit {proc.poll()}):\n{text[-3000:]}")


def _probe_budget(probe: Obj) -> float:
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def test_dev_container_command_passes_its_own_probes(rendered: dict[str, Rendered], model_dir: Path,
                                                     tmp_path: Path) -> None:
    r = rendered["overlays/dev"]
    c = r.server_container()
    env = _container_env(r)
    port, metrics_port = _free_port(), _free_port()
    env |= {"SLUICE_PORT": str(port), "SLUICE_METRICS_PORT": str(metrics_port)}
    if (ROOT / env["SLUICE_MODEL"]).resolve() != model_dir.resolve():
        env["SLUICE_MODEL"] = str(model_dir)  # SLUICE_TEST_MODELS points elsewhere: same model, other folder
    log = tmp_path / "server.log"
    with _serve([*c["command"], *c["args"]], env, log) as proc:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        took = _wait_serving(proc, channel, _probe_budget(c["startupProbe"]), log)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        for name in PROBES:
            probe = c[name]
            # What the kubelet does: Check(service) on the probe's port, within the probe's timeout.
            assert probe["grpc"]["port"] == int(r.config()["SLUICE_PORT"])
            request = health_pb2.HealthCheckRequest(service=probe["grpc"]["service"])
            reply = health.Check(request, timeout=probe["timeoutSeconds"])
            assert reply.status == SERVING, f"{name} would fail"
        # The ServiceMonitor's endpoint, and the series the HPA scales on.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert b"sluice_requests_waiting" in resp.read()
        channel.close()
        # SIGTERM as the kubelet sends it after preStop: drained and exited 0 within the remaining grace.
        spec = pod_spec(r.deployment())
        pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=spec["terminationGracePeriodSeconds"] - pre_stop) == 0
    assert took < _probe_budget(c["startupProbe"])


def _self_signed(tmp: Path, name: str) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(tmp / "tls.key"),
                    "-out", str(tmp / "tls.crt")], check=True, capture_output=True, timeout=60)


def _run_probe(command: list[str], port: int, tls_dir: Path) -> int:
    """An exec probe as the kubelet runs it, with the mounted paths mapped into this checkout."""
    argv = [sys.executable, str(PROBE_SCRIPT), *command[2:]]
    argv[4] = str(port)  # SERVICE, SERVER_NAME, PORT, TIMEOUT follow the script
    env = {**os.environ, "PROBE_TLS_DIR": str(tls_dir)}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_prod_tls_probes_pass_against_a_tls_server(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    prod = rendered["overlays/prod"].server_container()
    dev = rendered["overlays/dev"]
    server_name = prod["readinessProbe"]["exec"]["command"][3]
    _self_signed(tmp_path, server_name)
    port, metrics_port = _free_port(), _free_port()
    # The dev ConfigMap (the prod models are not on this machine) with prod's TLS; the guard is not what
    # this test is about.
    env = _container_env(dev) | {
        "SLUICE_PORT": str(port), "SLUICE_METRICS_PORT": str(metrics_port), "SLUICE_GUARD_BACKEND": "none",
        "SLUICE_TLS_CERT": str(tmp_path / "tls.crt"), "SLUICE_TLS_KEY": str(tmp_path / "tls.key"),
    }
    log = tmp_path / "server.log"
    c = dev.server_container()
    with _serve([*c["command"], *c["args"]], env, log) as proc:
        credentials = grpc.ssl_channel_credentials((tmp_path / "tls.crt").read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                      options=[("grpc.ssl_target_name_override", server_name)])
        _wait_serving(proc, channel, _probe_budget(prod["startupProbe"]), log)
        for name in PROBES:
            assert _run_probe(prod[name]["exec"]["command"], port, tmp_path) == 0, f"{name} would fail"
        wrong_name = list(prod["readinessProbe"]["exec"]["command"])
        wrong_name[3] = "not-" + server_name
        assert _run_probe(wrong_name, port, tmp_path) == 1, "a certificate for another name must not pass"
        # Why prod needs the script: a plaintext health check (the kubelet's gRPC probe) cannot pass.
        plain = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError):
            plain.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
