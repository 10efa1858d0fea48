"""The Prefect UI in a real browser (Debian's chromium through playwright): find ingest/podcasts, start a
custom run from its form with a feed URL, watch the run reach Completed. Screenshots of every step go to
tests/artifacts/ui/ (ignored by git)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent / "artifacts" / "ui"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (make sysdeps installs Debian's chromium)")
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(30_000)
            yield pg
        finally:
            browser.close()


def test_custom_run_from_the_deployment_form(prefect_stack, podcast_run, page) -> None:
    from playwright.sync_api import expect

    stack = prefect_stack
    step = iter(range(1, 100))

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"{next(step):02d}-{name}.png"), full_page=True)

    # Every API call the page makes, with its status and time, goes to requests.log next to the screenshots: the
    # UI's "Oops. Something went wrong." toast stands for any 5xx or network error, and this says which call.
    calls: list[str] = []
    bad: list[str] = []
    started: dict = {}
    page.on("request", lambda r: started.__setitem__(r, time.monotonic()))

    def done(r, status: int | str) -> None:
        took = time.monotonic() - started.pop(r, time.monotonic())
        if "/api/" in r.url:
            calls.append(f"{time.strftime('%H:%M:%S')} {status} {took:6.2f}s {r.method} {r.url.split('/api', 1)[1]}")
            if not isinstance(status, int) or status >= 500:
                bad.append(f"{calls[-1]} {r.post_data or ''}")

    page.on("requestfinished", lambda r: done(r, r.response().status if r.response() else "no response"))
    page.on("requestfailed", lambda r: done(r, f"failed ({r.failure})"))

    def failure(what: str) -> str:
        (SHOTS / "requests.log").write_text("\n".join(calls) + "\n")
        pending = [f"{r.method} {r.url} ({time.monotonic() - t:.0f} s)" for r, t in started.items()]
        return f"{what}; failed calls: {bad}; still pending: {pending}\n{stack.log_tail(6000)}"

    page.goto(f"{stack.ui}/deployments")
    expect(page.get_by_role("link", name="podcasts")).to_be_visible()
    shot("deployments")
    page.get_by_role("link", name="podcasts").first.click()
    expect(page.get_by_role("button", name="Run", exact=True)).to_be_visible()
    shot("deployment-podcasts")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    feeds = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(r"^feeds")))
    feeds.get_by_role("button", name="Add item").click()
    feeds.locator("textarea").fill(stack.feed_url)
    shot("custom-run-form")
    toast = page.locator(".toast-flow-run-create__message--emphasized").first
    # Failure shows as the form's own message or as the UI's generic API error toast.
    failed = page.get_by_text(re.compile("Something went wrong trying to create a flow run|Oops. Something went wrong"))
    # A worker's poll landing while the SQLite server creates the run makes the insert fail at once with "database
    # is locked" (a 503, which Prefect's Python client retries and the UI shows as a toast: PrefectHQ/prefect#18934,
    # README): submit again, as a user would.
    for _attempt in range(5):
        failures = failed.count()
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not toast.is_visible() and failed.count() == failures:
            page.wait_for_timeout(200)
        if toast.is_visible() or failed.count() == failures:
            break
        shot("create-failed-retrying")
        page.wait_for_timeout(3000)
    assert toast.is_visible(), failure("no run created")
    run_name = toast.inner_text().strip()
    shot("run-created")
    # The UI may stay on the form or move to the deployment page; the run's own page is the same either way.
    created = stack.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": [run_name]}}})
    assert len(created) == 1, created
    run_id = created[0]["id"]
    page.goto(f"{stack.ui}/runs/flow-run/{run_id}")
    shot("flow-run")
    state = page.locator(".page-heading-flow-run__meta .state-badge")
    expect(state).to_have_text("Completed", timeout=300_000)
    shot("flow-run-completed")

    run = stack.get(f"/flow_runs/{run_id}")
    assert run["name"] == run_name and run["state_type"] == "COMPLETED"
    assert run["parameters"]["feeds"] == [stack.feed_url] and run["parameters"]["dataset"] == "podcasts"
    (SHOTS / "requests.log").write_text("\n".join(calls) + "\n")
    shots = {p.stem.split("-", 1)[1] for p in SHOTS.glob("*.png")}  # plus any create-failed-retrying
    assert {"deployments", "deployment-podcasts", "custom-run-form", "run-created", "flow-run",
            "flow-run-completed"} <= shots
