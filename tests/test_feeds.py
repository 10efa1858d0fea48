"""Podcast feeds without Prefect: parsing, safety, bounded downloads, GUID skip."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import feeds
from tasks.sources import FetchConfig, FetchError, download, fetch_bytes
from tests.httpserve import rss, serve

ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Atom cast</title><id>urn:feed</id>
<updated>2025-02-01T00:00:00Z</updated>
<entry><title>Atom one</title><id>urn:ep:1</id><updated>2025-02-01T00:00:00Z</updated>
<link rel="alternate" href="https://example.com/1"/>
<link rel="enclosure" type="audio/ogg" href="media/one.ogg" length="123"/></entry>
</feed>"""


def test_rss_episodes_keep_metadata_newest_first() -> None:
    doc = rss([
        {"guid": "g-old", "title": "Old one", "url": "https://cdn.example.com/old.mp3",
         "pubDate": "Mon, 06 Jan 2025 10:00:00 +0000", "link": "https://example.com/old"},
        {"guid": "g-new", "title": "New &amp; shiny", "url": "https://cdn.example.com/new.mp3",
         "pubDate": "Tue, 07 Jan 2025 10:00:00 +0000", "length": "2048"},
        {"guid": "g-file", "title": "Local", "url": "file:///etc/passwd"},  # never from a feed
        {"guid": "g-ftp", "title": "FTP", "url": "ftp://example.com/a.mp3"},
    ])
    eps = feeds.parse_feed(doc.encode(), "https://example.com/feed.xml")
    assert [e.guid for e in eps] == ["g-new", "g-old"]
    new = eps[0]
    assert new.title == "New & shiny" and new.published == "2025-01-07T10:00:00Z" and new.length == 2048
    assert new.meta() == {"feed": "https://example.com/feed.xml", "title": "New & shiny",
                          "published": "2025-01-07T10:00:00Z", "guid": "g-new",
                          "url": "https://cdn.example.com/new.mp3"}
    assert eps[1].link == "https://example.com/old"


def test_atom_relative_enclosure_resolves_against_the_feed() -> None:
    eps = feeds.parse_feed(ATOM.encode(), "https://example.com/pod/feed.atom")
    assert len(eps) == 1
    assert eps[0].url == "https://example.com/pod/media/one.ogg"
    assert eps[0].guid == "urn:ep:1" and eps[0].type == "audio/ogg"


@pytest.mark.parametrize("doc", [
    # billion laughs
    '<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    '<rss version="2.0"><channel><title>&b;</title></channel></rss>',
    # external entity (XXE)
    '<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<rss version="2.0"><channel><title>&x;</title></channel></rss>',
])
def test_unsafe_xml_is_refused(doc: str) -> None:
    with pytest.raises(feeds.UnsafeFeed):
        feeds.parse_feed(doc.encode(), "https://example.com/feed.xml")


def test_not_a_feed_is_an_error() -> None:
    with pytest.raises(FetchError):
        feeds.parse_feed(b"\x00\x01 definitely not xml <<<", "https://example.com/feed.xml")


def test_fetch_feed_and_download_over_http(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "media").mkdir(parents=True)
    (site / "media" / "ep1.mp3").write_bytes(b"ID3" + b"\x01" * 5000)
    (site / "feed.xml").write_text(rss([{"guid": "ep-1", "title": "One", "url": "media/ep1.mp3"}]))
    cache = tmp_path / "cache"
    with serve(site) as base:
        eps = feeds.fetch_feed(f"{base}/feed.xml")
        assert [e.url for e in eps] == [f"{base}/media/ep1.mp3"]
        src = feeds.download_episode(eps[0], cache)
        assert Path(src.path).read_bytes() == (site / "media" / "ep1.mp3").read_bytes()
        assert Path(src.path).parent == cache and Path(src.path).suffix == ".mp3"
        assert src.uri == f"{base}/media/ep1.mp3" and src.meta["guid"] == "ep-1" and src.meta["feed"].endswith("/feed.xml")
        assert not list(cache.glob("*.part"))
        with pytest.raises(FetchError, match="bytes > limit"):  # the feed's own length is checked first
            feeds.download_episode(feeds.Episode(feed="f", guid="g", title="t", published="", url=f"{base}/x.mp3",
                                                 length=10**12), cache)


def test_downloads_are_bounded(tmp_path: Path) -> None:
    small = FetchConfig(max_bytes=10_000, timeout_s=1.0, connect_timeout_s=1.0)
    with serve(tmp_path) as base:
        with pytest.raises(FetchError, match="limit"):  # declared too big: refused before reading
            download(f"{base}/huge", tmp_path / "c", small)
        with pytest.raises(FetchError, match="more than"):  # no Content-Length: counted while reading
            download(f"{base}/nolength?n=50000", tmp_path / "c", small)
        with pytest.raises(FetchError, match="longer than") as slow:  # a server that drips for ever
            download(f"{base}/slow", tmp_path / "c", small)
        with pytest.raises(FetchError, match="HTTP 404") as missing:
            download(f"{base}/missing.mp3", tmp_path / "c", small)
        assert slow.value.transient and not missing.value.transient  # only the first is worth a retry
        assert fetch_bytes(f"{base}/nolength?n=500", 1000, 5.0) == b"\0" * 500
        assert not list((tmp_path / "c").glob("*"))  # nothing half-written left behind


def test_only_http_schemes_even_through_redirects(tmp_path: Path) -> None:
    (tmp_path / "a.mp3").write_bytes(b"x")
    for url in ("file:///etc/passwd", "ftp://example.com/a.mp3", "data:audio/mpeg;base64,AAAA", "/etc/passwd"):
        with pytest.raises(FetchError, match="not allowed"):
            download(url, tmp_path / "c")
    with serve(tmp_path) as base:
        with pytest.raises(FetchError, match="not allowed"):
            download(f"{base}/redirect?to=file:///etc/passwd", tmp_path / "c")
        ok = download(f"{base}/redirect?to={base}/a.mp3", tmp_path / "c")
        assert ok.read_bytes() == b"x"


def test_guid_skip(tmp_path: Path) -> None:
    ep = lambda guid: feeds.Episode(feed="f", guid=guid, title=guid, published="", url=f"https://e.com/{guid}.mp3")  # noqa: E731
    eps = [ep("c"), ep("b"), ep("a"), ep("b")]
    assert [e.guid for e in feeds.new_episodes(eps, {"a"})] == ["c", "b"]
    assert [e.guid for e in feeds.new_episodes(eps, set(), max_episodes=1)] == ["c"]
    # What a published dataset already holds, read without its lock.
    ds = tmp_path / "ds"
    assert feeds.ingested_keys(ds) == set()
    ds.mkdir()
    pq.write_table(pa.Table.from_pylist([{"recording_id": "r1", "guid": "a"}, {"recording_id": "r2", "guid": None}]),
                   ds / "recordings.parquet")
    assert feeds.ingested_keys(ds) == set()  # no manifest: not a published dataset
    (ds / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    assert feeds.ingested_keys(ds) == {"r1", "r2", "a"}
