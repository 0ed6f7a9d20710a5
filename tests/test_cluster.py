"""The cluster configs: Ray launcher YAML vs Ray's own schema, the KubeRay manifest, the MLflow
recipe's safe defaults. Static checks only (no cloud, no Kubernetes, no server started)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _ray_schema() -> dict:
    # shipped in the ray wheel: ray/autoscaler/ray-schema.json
    try:
        text = resources.files("ray").joinpath("autoscaler", "ray-schema.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        import ray

        text = (Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()
    return json.loads(text)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_validates_against_rays_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(launcher, _ray_schema())


def test_schema_check_is_not_vacuous(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    bad = {**launcher, "not_a_ray_key": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def test_ray_cluster_layout(launcher):
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    instance = {t["node_config"]["InstanceType"] for t in types.values()}
    assert any(i.startswith("g5.") for i in instance) and any(i.startswith("p4d.") for i in
                                                               instance)
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t.get("min_workers", 0) == 0 for t in gpu_types)
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    # the project is mounted and installed on every node
    assert "." in launcher["file_mounts"].values()
    assert any("pip install" in c and "constraints.txt" in c for c in launcher["setup_commands"])
    # the Ray version of the image is the one pinned for the project
    pins = (CLUSTER.parent / "constraints.txt").read_text()
    ray_pin = [ln.split("==")[1] for ln in pins.splitlines() if ln.startswith("ray==")][0]
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}")


def test_ray_cluster_keeps_token_auth_and_env(launcher):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(launcher[key])
        assert "RAY_AUTH_MODE=token" in start and "disabled" not in start
        assert "perl.env" in start  # MLFLOW_TRACKING_URI & co. exported before `ray start`
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    env = (CLUSTER / "perl.env.example").read_text()
    assert "MLFLOW_TRACKING_URI=" in env
    assert "perl.env" in (CLUSTER / ".gitignore").read_text().split()


def test_kuberay_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()) if d]
    assert {(d["apiVersion"], d["kind"]) for d in docs} == {("ray.io/v1", "RayJob")}
    (job,) = docs
    spec = job["spec"]
    assert "python -m pipeline.run sweeps/base2novel.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == "2.60.0"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"]
                                                     for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert secrets, f"container {c['name']} gets no env from a Secret"
            # credentials come from the Secret, never inline in the manifest
            assert not any("AWS_SECRET" in str(e) for e in c.get("env", []))
    gpu = [g for g in cluster["workerGroupSpecs"]
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu, "no GPU worker group"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env["env_vars"], dict)


def _server_cmd(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(env_extra)
    out = subprocess.run(["bash", str(CLUSTER / "mlflow" / "mlflow-server.sh"), "--print"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_mlflow_recipe_binds_localhost_by_default():
    base = {"MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:pw@db:5432/mlflow",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts"}
    cmd = _server_cmd(base)
    assert "--host 127.0.0.1" in cmd
    assert "--backend-store-uri postgresql://" in cmd
    assert "--artifacts-destination s3://bucket/mlartifacts" in cmd
    assert "pw@" not in cmd  # a password in the URI is never printed
    assert "basic-auth" not in cmd
    cmd = _server_cmd({**base, "MLFLOW_AUTH": "basic", "MLFLOW_AUTH_CONFIG_PATH": "auth.ini",
                       "MLFLOW_HOST": "10.0.0.10"})
    assert "--app-name basic-auth" in cmd and "--host 10.0.0.10" in cmd


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_mlflow_recipe_refuses_missing_settings():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(CLUSTER / "mlflow" / "mlflow-server.sh"), "--print"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in out.stderr


def test_mlflow_docs_mention_auth_and_localhost():
    text = (CLUSTER / "mlflow" / "README.md").read_text()
    assert "127.0.0.1" in text and "basic-auth" in text and "nginx-mlflow.conf" in text
    ini = (CLUSTER / "mlflow" / "basic_auth.ini.example").read_text()
    # no admin password committed: it comes from MLFLOW_AUTH_ADMIN_PASSWORD at first start
    assert not any(ln.strip().startswith("admin_password") for ln in ini.splitlines())
