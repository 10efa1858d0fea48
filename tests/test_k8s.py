"""docker/k8s/base-job-template.json: accepted by a real Prefect server as a Kubernetes work pool's template, and
rendered by prefect-kubernetes' own job configuration into a GPU Job (GPU requests, node selector, tolerations,
the HF token and storage secrets, the model cache volume)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from flows.serve import api_call

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docker" / "k8s" / "base-job-template.json"


@pytest.mark.slow
def test_kubernetes_pool_template_renders_a_gpu_job(prefect_stack) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    stack = prefect_stack
    stack.prefect("work-pool", "create", "csm-k8s", "--type", "kubernetes", "--base-job-template", str(TEMPLATE))
    try:
        pool = stack.get("/work_pools/csm-k8s")
        template = json.loads(TEMPLATE.read_text())
        assert pool["type"] == "kubernetes" and pool["base_job_template"] == template

        values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
        values.update(gpu_count=2, image="registry.example/csm-dataprep:1")  # what a deployment's job_variables set
        with temporary_settings({PREFECT_API_URL: stack.api}):
            cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template,
                                                                                           values))
        pod = cfg.job_manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "registry.example/csm-dataprep:1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"secretRef": {"name": "hf-token", "optional": True}} in container["envFrom"]
        assert {"secretRef": {"name": "object-storage", "optional": True}} in container["envFrom"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "csm-model-cache"
        assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["model-cache"] == "/models"
        assert cfg.env["HF_HOME"] == "/models/hf" and cfg.env["CSM_CACHE_DIR"].startswith("/scratch")
    finally:
        # Removed again, so the later tests see only prefect.yaml's pools. (The UI form failures once blamed on
        # this pool were SQLite "database is locked" 503s under the workers' writes: tests/test_ui.py retries.)
        api_call("DELETE", f"{stack.api}/work_pools/csm-k8s")


def test_cpu_template_is_the_gpu_one_without_gpus() -> None:
    gpu = json.loads(TEMPLATE.read_text())
    cpu = json.loads((TEMPLATE.parent / "cpu-job-template.json").read_text())
    assert cpu["job_configuration"] == gpu["job_configuration"]
    defaults = {k: v.get("default") for k, v in cpu["variables"]["properties"].items()}
    assert defaults["gpu_count"] == 0 and defaults["node_selector"] == {} and defaults["tolerations"] == []
    changed = {k for k, v in gpu["variables"]["properties"].items() if cpu["variables"]["properties"][k] != v}
    assert changed <= {"gpu_count", "node_selector", "tolerations", "cpu_request", "memory_request", "memory_limit",
                       "scratch_size"}
