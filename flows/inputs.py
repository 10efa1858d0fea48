"""Prefect tasks around tasks/sources.py and tasks/feeds.py: the ingest flow's inputs, made local.

Fetching is retried (network hiccups); an input that still fails is logged and left out, and the run goes on
with the others. Episodes already in the dataset (by GUID) are skipped before anything is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from schemas.records import Source
from tasks import feeds as feeds_mod
from tasks.sources import FetchConfig, FetchError, Resolved, resolve_sources


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network trouble, not a 404, a size limit or a refused scheme."""
    exc = state.data
    return not isinstance(exc, FetchError) or exc.transient


fetch_task = task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5,
                  retry_condition_fn=_transient)


@fetch_task
def fetch_feed(url: str, cfg: FetchConfig) -> list[feeds_mod.Episode]:
    return feeds_mod.fetch_feed(url, cfg)


@fetch_task
def download_episode(ep: feeds_mod.Episode, cache_dir: str, cfg: FetchConfig) -> Source:
    return feeds_mod.download_episode(ep, cache_dir, cfg)


@task(cache_policy=NO_CACHE, persist_result=False)
def resolve(sources: list[str], cache_dir: str, cfg: FetchConfig) -> Resolved:
    return resolve_sources(sources, cache_dir, cfg)


@dataclass
class Inputs:
    sources: list[Source] = field(default_factory=list)
    downloaded: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    episodes_seen: int = 0  # feed episodes skipped: already in the dataset
    feeds_ok: int = 0


def gather(sources: list[str], feeds: list[str], dataset_dir: Path, cache_dir: Path, cfg: FetchConfig) -> Inputs:
    """Local files for every source and every new feed episode."""
    logger = get_run_logger()
    out = Inputs()
    if sources:
        r = resolve(sources, str(cache_dir), cfg)
        out.sources += r.sources
        out.downloaded += r.downloaded
        out.failures += r.failures
    if feeds:
        seen = feeds_mod.ingested_keys(dataset_dir)
        episodes: list[feeds_mod.Episode] = []
        for url, fut in zip(feeds, fetch_feed.map(feeds, unmapped(cfg)), strict=True):
            got = fut.result(raise_on_failure=False)
            if isinstance(got, BaseException):
                out.failures.append((url, f"{type(got).__name__}: {got}"))
                continue
            out.feeds_ok += 1
            new = feeds_mod.new_episodes(got, seen | {e.guid for e in episodes}, cfg.max_episodes)
            out.episodes_seen += sum(1 for e in got if e.guid in seen)
            logger.info("%s: %d episodes, %d new%s", url, len(got), len(new),
                        f" (taking the newest {cfg.max_episodes})" if cfg.max_episodes else "")
            episodes += new
        for i in range(0, len(episodes), cfg.parallel_downloads):  # at most `parallel_downloads` in flight
            batch = episodes[i:i + cfg.parallel_downloads]
            futures = download_episode.map(batch, unmapped(str(cache_dir)), unmapped(cfg))
            for ep, fut in zip(batch, futures, strict=True):
                got = fut.result(raise_on_failure=False)
                if isinstance(got, BaseException):
                    out.failures.append((ep.url, f"{type(got).__name__}: {got}"))
                else:
                    out.sources.append(got)
                    out.downloaded.append(Path(got.path))
    for uri, reason in out.failures:
        logger.warning("could not fetch %s: %s", uri, reason)
    return out
