"""Small helpers around a running Prefect server, for `make serve` and the tests.

    python -m flows.serve wait URL [--timeout S]             wait until the server answers /api/health
    python -m flows.serve set-config DEPLOYMENT FILE.yaml    make FILE the `config` parameter of DEPLOYMENT
                                                             (e.g. train/csm and a CPU training config)

The API URL comes from PREFECT_API_URL. Plain HTTP calls: nothing here imports the flows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml


def wait_healthy(api_url: str, timeout: float = 120.0) -> None:
    """Block until GET {api_url}/health answers 200; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"no Prefect server at {api_url} after {timeout:g} s ({last})")


def api_call(method: str, url: str, attempts: int = 5, **kwargs: Any) -> httpx.Response:
    """An API call, retried while the server answers 503 (a busy SQLite database right after a deploy)."""
    for attempt in range(attempts):
        r = httpx.request(method, url, timeout=30, **kwargs)
        if r.status_code != 503 or attempt == attempts - 1:
            r.raise_for_status()
            return r
        time.sleep(2 * (attempt + 1))
    raise AssertionError("unreachable")


def deployment(api_url: str, name: str) -> dict[str, Any]:
    """A deployment by its full name, 'flow/deployment'."""
    return api_call("GET", f"{api_url.rstrip('/')}/deployments/name/{name}").json()


def set_parameters(api_url: str, name: str, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into a deployment's default parameters; returns the new parameters."""
    dep = deployment(api_url, name)
    params = {**dep.get("parameters", {}), **updates}
    api_call("PATCH", f"{api_url.rstrip('/')}/deployments/{dep['id']}", json={"parameters": params})
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait")
    w.add_argument("url", nargs="?", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    w.add_argument("--timeout", type=float, default=120.0)
    s = sub.add_parser("set-config")
    s.add_argument("deployment")
    s.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "wait":
        wait_healthy(args.url, args.timeout)
        print(f"Prefect server up at {args.url}")
    else:
        api = os.environ.get("PREFECT_API_URL")
        if not api:
            parser.error("set PREFECT_API_URL")
        config = yaml.safe_load(args.file.read_text()) or {}
        set_parameters(api, args.deployment, {"config": config})
        print(f"{args.deployment}: config from {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
