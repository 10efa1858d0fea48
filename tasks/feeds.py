"""Podcast feeds (RSS 2.0 / Atom) -> episodes -> local files to ingest.

Safety: a feed is fetched over http(s) only, with a size and time bound (tasks.sources), checked with
defusedxml (no entity declarations, no external references: no billion laughs, no XXE) before feedparser
sees it, and handed to feedparser as a byte stream (so feedparser itself never opens a URL or a file).
Enclosures must be http(s) too: a feed cannot make the worker read file:// or ftp:// URLs, and the download
is bounded like any other.
"""

from __future__ import annotations

import calendar
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from schemas.records import Source
from tasks.sources import AUDIO_SUFFIXES, HTTP_SCHEMES, FetchConfig, FetchError, check_scheme, download, fetch_bytes

AUDIO_TYPE_SUFFIX = {"audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/mp4": ".m4a", "audio/x-m4a": ".m4a",
                     "audio/aac": ".aac", "audio/ogg": ".ogg", "audio/opus": ".opus", "audio/flac": ".flac",
                     "audio/x-flac": ".flac", "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/webm": ".webm",
                     "video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv"}


class UnsafeFeed(FetchError):
    """The feed document declares entities or references external resources."""


@dataclass
class Episode:
    feed: str  # the feed's URL
    guid: str
    title: str
    published: str  # ISO 8601 UTC when the feed gives a parsable date, else as given
    url: str  # the enclosure (the audio)
    link: str = ""  # the episode's web page
    type: str = ""
    length: int | None = None  # bytes, as the feed declares it
    published_ts: float = 0.0

    def meta(self) -> dict[str, str]:
        """Source.meta: what the dataset keeps about the episode (feed, title, published, guid, url)."""
        m = {"feed": self.feed, "title": self.title, "published": self.published, "guid": self.guid, "url": self.url}
        return {k: v for k, v in m.items() if v}


def check_xml_safe(data: bytes) -> None:
    """Raise UnsafeFeed if the document declares entities or references external resources. A document that
    is merely malformed passes: feedparser's loose parser copes with it and never expands declared entities."""
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        DET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise UnsafeFeed(f"unsafe XML: {type(exc).__name__}: {exc}") from exc
    except ParseError:
        pass


def parse_feed(data: bytes, feed_url: str) -> list[Episode]:
    """Episodes with an http(s) audio/video enclosure, newest first. Relative enclosure URLs resolve against
    the feed URL. An entry without a GUID is identified by its enclosure URL."""
    import feedparser

    check_xml_safe(data)
    parsed = feedparser.parse(io.BytesIO(data), response_headers={"content-location": feed_url},
                              sanitize_html=True, resolve_relative_uris=True)
    if parsed.bozo and not parsed.entries:
        raise FetchError(f"{feed_url}: not a feed ({parsed.get('bozo_exception')})")
    episodes = []
    for entry in parsed.entries:
        enclosure = _audio_enclosure(entry)
        if enclosure is None:
            continue
        url = urljoin(feed_url, str(enclosure.get("href") or "").strip())
        try:
            check_scheme(url, HTTP_SCHEMES)
        except FetchError:
            continue  # no file://, ftp://, data: ... from a feed
        ts_struct = entry.get("published_parsed") or entry.get("updated_parsed")
        ts = float(calendar.timegm(ts_struct)) if ts_struct else 0.0
        published = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts_struct
                     else str(entry.get("published") or entry.get("updated") or ""))
        length = str(enclosure.get("length") or "")
        episodes.append(Episode(
            feed=feed_url, guid=str(entry.get("id") or url), title=str(entry.get("title") or ""),
            published=published, url=url, link=str(entry.get("link") or ""), type=str(enclosure.get("type") or ""),
            length=int(length) if length.isdigit() else None, published_ts=ts))
    episodes.sort(key=lambda e: e.published_ts, reverse=True)
    return episodes


def _audio_enclosure(entry: Any) -> dict | None:
    links = list(entry.get("enclosures") or []) + [
        link for link in entry.get("links") or [] if link.get("rel") == "enclosure"]
    for link in links:
        kind = str(link.get("type") or "").lower()
        suffix = Path(urlparse(str(link.get("href") or "")).path).suffix.lower()
        if kind.startswith(("audio/", "video/")) or suffix in AUDIO_SUFFIXES:
            return link
    return None


def fetch_feed(url: str, cfg: FetchConfig | None = None) -> list[Episode]:
    """Fetch (http/https, bounded) and parse one feed."""
    cfg = cfg or FetchConfig()
    return parse_feed(fetch_bytes(url, cfg.feed_max_bytes, cfg.feed_timeout_s, cfg.connect_timeout_s), url)


def ingested_keys(dataset_dir: str | Path) -> set[str]:
    """Recording ids and episode GUIDs already in a published dataset (what DatasetWriter.seen answers), read
    without taking the dataset's lock, so a run skips known episodes before downloading them."""
    from tasks import storage

    if not storage.exists(storage.join(dataset_dir, "manifest.json")):
        return set()
    rows = storage.read_parquet(storage.join(dataset_dir, "recordings.parquet"), columns=["recording_id", "guid"])
    return {r["recording_id"] for r in rows} | {r["guid"] for r in rows if r.get("guid")}


def new_episodes(episodes: list[Episode], seen: set[str], max_episodes: int | None = None) -> list[Episode]:
    """Episodes whose GUID is not in `seen` (and not repeated), newest first, at most `max_episodes`."""
    out, guids = [], set()
    for ep in episodes:
        if ep.guid in seen or ep.guid in guids:
            continue
        guids.add(ep.guid)
        out.append(ep)
    return out[:max_episodes] if max_episodes else out


def download_episode(ep: Episode, cache_dir: str | Path, cfg: FetchConfig | None = None) -> Source:
    """The episode's enclosure into the cache (http/https only, bounded); its Source keeps the metadata."""
    cfg = cfg or FetchConfig()
    if ep.length and ep.length > cfg.max_bytes:
        raise FetchError(f"{ep.url}: the feed declares {ep.length} bytes > limit {cfg.max_bytes}")
    path = download(ep.url, cache_dir, cfg, suffix=AUDIO_TYPE_SUFFIX.get(ep.type.lower(), ""))
    return Source(uri=ep.url, path=str(path), meta=ep.meta())
