"""docker/: the compose file and the Dockerfile parse and point at files that exist; with a usable docker,
`docker compose config` and the Dockerfile build checks pass too (a full image build is minutes of torch
wheels, left to CI with docker)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def dockerignored(rel: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_dockerfile_is_complete_and_its_inputs_exist() -> None:
    steps = dockerfile_instructions(DOCKER / "Dockerfile")
    kinds = [k for k, _ in steps]
    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds and "CMD" in kinds
    assert all(k in {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "VOLUME", "CMD", "LABEL", "EXPOSE", "USER"}
               for k in kinds), kinds
    base = next(a for k, a in steps if k == "FROM")
    assert "python:3.11" in base  # the Python the lock was compiled for
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "ffmpeg" in runs and "requirements.lock" in runs
    for k, args in steps:
        if k == "COPY":
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: missing from the build context"
                assert src == "." or not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    for needed in ("requirements.lock", "pyproject.toml", "flows/ingest.py", "flows/train.py", "prefect.yaml"):
        assert not dockerignored(needed), needed


def test_compose_stack() -> None:
    doc = compose()
    services = doc["services"]
    assert {"postgres", "server", "deployments", "worker-cpu", "worker-gpu"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in doc["volumes"], f"{name}: volume {vol} not declared"
    db_url = services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db_url
    # Workers serve the pools prefect.yaml deploys to; the GPU worker reserves the GPUs.
    pools = {p["name"] for p in yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pools"].values()}
    worker_pools = {svc["command"][svc["command"].index("--pool") + 1] for n, svc in services.items() if n.startswith("worker-")}
    assert worker_pools == pools
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("worker-cpu", "worker-gpu", "deployments"):
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://server:4200/api"


def _docker_usable() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
def test_docker_accepts_them() -> None:
    if not _docker_usable():
        pytest.skip("no usable docker daemon")
    proc = subprocess.run(["docker", "compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["docker", "build", "--check", "-f", str(DOCKER / "Dockerfile"), str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
