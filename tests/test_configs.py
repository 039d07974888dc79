"""The cluster and deployment files parse and carry what their consumers require: the Ray launcher config passes
Ray's own schema (shipped with Ray), the Kubernetes manifests have the fields the API server and KubeRay need, the
compose file's services are complete and every secret it reads is declared in env.example. They are not applied
to a cloud or a Kubernetes cluster here."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_ray_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    gpu = [name for name, node in types.items() if name != config["head_node_type"]]
    assert gpu and all(types[name]["min_workers"] <= types[name]["max_workers"] for name in gpu)  # autoscales
    assert any("autoprune" in command for command in config["setup_commands"])  # installed on every node
    raw["available_node_types"]["gpu_a10g"]["max_wrkers"] = 3
    with pytest.raises(Exception, match="max_wrkers"):  # the check can fail
        validate_config(prepare_config(raw))


def test_the_onprem_launcher_config_passes_rays_schema():
    """cluster/onprem.yaml (launched for real in test_team_server.py, where SSH runs): Ray's schema for the local
    provider; the head's address where its `ray start` needs it; the token and the environment on every node."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    head = config["provider"]["head_ip"]
    assert any(f"--node-ip-address={head}" in command for command in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in command for command in config["worker_start_ray_commands"])
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    setup = " ".join(config["setup_commands"])
    assert "autoprune" in setup and "RAY_AUTH_MODE=token" in setup and "autoprune-env/bin:$PATH" in setup
    raw["provider"].pop("head_ip")
    with pytest.raises(BaseException, match="head_ip"):  # the check can fail (Ray's launcher aborts)
        validate_config(prepare_config(raw))


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, where
    for container in containers:
        assert container["name"] and container["image"], where


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_the_kuberay_manifests_have_what_kuberay_requires(name):
    (doc,) = _documents(ROOT / "cluster" / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    _check_pod_template(cluster["headGroupSpec"]["template"], "head")
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"]
        _check_pod_template(group["template"], group["groupName"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in limits  # GPU workers
    if doc["kind"] == "RayJob":
        entrypoint = doc["spec"]["entrypoint"]
        assert "autoprune search" in entrypoint and "--tracking-uri" in entrypoint and "--storage" in entrypoint


def test_the_mlflow_kubernetes_manifests_are_complete():
    docs = _documents(ROOT / "deploy" / "kubernetes" / "mlflow.yaml")
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "ConfigMap"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"] and doc["metadata"]["namespace"] == "mlflow"
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = next(doc for doc in docs if doc["kind"] == "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    _check_pod_template(deployment["spec"]["template"], "mlflow")
    args = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--app-name basic-auth" in args and "--serve-artifacts" in args
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    configparser.ConfigParser().read_string(config["data"]["basic_auth.ini"])


def test_the_compose_file_is_complete_and_its_secrets_are_declared():
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # loopback unless a proxy is put in front
    build = services["mlflow"]["build"]
    assert (deploy / build["context"] / build["dockerfile"]).exists()
    command = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in command and "postgresql+psycopg2://" in command and "s3://" in command
    declared = {line.split("=", 1)[0] for line in (deploy / "env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#")}
    used = set(re.findall(r"\$\{(\w+)", (deploy / "docker-compose.yml").read_text()))
    assert used <= declared, used - declared
    parser = configparser.ConfigParser()
    parser.read(deploy / "basic_auth.ini")
    assert parser["mlflow"]["database_uri"].startswith("sqlite:////var/lib/mlflow-auth/")  # on the volume
