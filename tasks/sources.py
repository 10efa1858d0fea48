"""Turn the user's SOURCE arguments into local files to ingest.

A source is a local file, folder or glob; an http(s) URL; an fsspec URI (s3://, gs://, memory://..., with
globs); or a manifest (.csv or .parquet, one source per row in a `uri` column). Remote bytes are copied into
a download cache (content lands under a name derived from the URI, written to a `.part` file and renamed
when complete), with a size bound, a time bound and a scheme check, so a bad server cannot fill the disk or
hang a run.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field

from schemas.records import Source

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".opus", ".ogg", ".oga", ".webm", ".mp4", ".mkv",
                  ".mov", ".wma", ".aif", ".aiff", ".mka"}
MANIFEST_SUFFIXES = {".csv", ".parquet"}
HTTP_SCHEMES = ("http", "https")
META_COLUMNS = ("feed", "title", "published", "guid", "url")  # = tasks.shards.SOURCE_META
GLOB_CHARS = set("*?[")


class FetchConfig(BaseModel):
    """Bounds on what an ingest run fetches from the network or remote storage."""

    max_bytes: int = Field(2_000_000_000, ge=1, description="Largest file downloaded (bytes); larger ones are skipped.")
    timeout_s: float = Field(1800.0, gt=0, description="Longest time one download may take (seconds).")
    connect_timeout_s: float = Field(20.0, gt=0, description="Connect / read-stall timeout (seconds).")
    feed_max_bytes: int = Field(20_000_000, ge=1, description="Largest feed document (bytes).")
    feed_timeout_s: float = Field(60.0, gt=0, description="Longest time fetching one feed may take (seconds).")
    max_episodes: int | None = Field(
        None, ge=1, description="Per feed, ingest at most this many not-yet-ingested episodes (newest first).")
    keep_downloads: bool = Field(False, description="Keep downloaded files in the cache after a successful run.")
    parallel_downloads: int = Field(4, ge=1, le=32, description="Downloads in flight at once.")
    allow_private_redirects: bool = Field(
        False, description="Follow a redirect from a public host to a private, loopback or link-local address "
        "(off: a feed's server cannot steer downloads into your network).")


class FetchError(Exception):
    """A remote source could not be fetched within the bounds (or is not allowed); the message says why.
    `transient`: worth retrying (network error, timeout, HTTP 5xx or 429), unlike a 404 or a size limit."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class Resolved:
    """Local files ready to ingest, the ones this resolution downloaded, and what could not be resolved."""

    sources: list[Source] = field(default_factory=list)
    downloaded: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)


def scheme_of(uri: str) -> str:
    """The URI scheme, '' for a plain path (a Windows drive letter is not a scheme)."""
    scheme = urlparse(uri).scheme
    return scheme.lower() if len(scheme) > 1 else ""


def check_scheme(url: str, allowed: tuple[str, ...] = HTTP_SCHEMES) -> None:
    scheme = scheme_of(url)
    if scheme not in allowed:
        raise FetchError(f"{url}: scheme {scheme or '(none)'!r} not allowed (allowed: {', '.join(allowed)})")
    if not urlparse(url).hostname:
        raise FetchError(f"{url}: no host")


def cache_name(uri: str, suffix: str = "") -> str:
    """File name in the download cache: a hash of the URI (stable across runs), keeping the audio suffix."""
    if not suffix:
        suffix = Path(unquote(urlparse(uri).path)).suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        suffix = ".bin"  # ffmpeg probes the content; the name only helps a human
    return hashlib.sha256(uri.encode()).hexdigest()[:32] + suffix


def _atomic_fill(dest: Path, fill: Callable[[io.BufferedWriter], None]) -> Path:
    """Write `dest` through a `.part` file renamed into place; a partial download never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as f:
            fill(f)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def is_private_host(url: str) -> bool:
    """Does the URL's host resolve to a private, loopback, link-local or reserved address?"""
    import ipaddress
    import socket

    host = urlparse(url).hostname or ""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, None)]
        except OSError:
            return False  # unresolvable: the request itself will fail and say so
    return any(a.is_private or a.is_loopback or a.is_link_local or a.is_reserved for a in addresses)


def check_redirect(origin: str, target: str, allow_private: bool = False) -> None:
    """A redirect may not lead from a public host into a private network unless allowed."""
    if not allow_private and is_private_host(target) and not is_private_host(origin):
        raise FetchError(f"{origin}: redirect to private address {target} refused (allow_private_redirects is off)")


def _http_stream(url: str, write: Callable[[bytes], None], max_bytes: int, timeout_s: float,
                 connect_timeout_s: float = 20.0, allowed: tuple[str, ...] = HTTP_SCHEMES,
                 allow_private_redirects: bool = False) -> dict[str, str]:
    """GET `url` into `write`, at most `max_bytes` and `timeout_s` in all; redirects (at most 5) must stay on an
    allowed scheme. Returns the response headers."""
    import httpx

    check_scheme(url, allowed)
    deadline = time.monotonic() + timeout_s
    timeout = httpx.Timeout(min(connect_timeout_s, timeout_s))
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout,
                          headers={"User-Agent": "csm-dataprep/0.1 (+https://github.com/SesameAILabs/csm)"}) as client:
            for _ in range(6):
                with client.stream("GET", url) as r:
                    if r.is_redirect and "location" in r.headers:
                        origin, url = url, str(r.url.join(r.headers["location"]))
                        check_scheme(url, allowed)  # e.g. no redirect to file:// or ftp://
                        check_redirect(origin, url, allow_private_redirects)
                        continue
                    if r.status_code != 200:
                        raise FetchError(f"{url}: HTTP {r.status_code}",
                                         transient=r.status_code >= 500 or r.status_code in (408, 429))
                    declared = r.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise FetchError(f"{url}: {declared} bytes > limit {max_bytes}")
                    got = 0
                    for chunk in r.iter_bytes():  # as received: the deadline is checked on every read
                        got += len(chunk)
                        if got > max_bytes:
                            raise FetchError(f"{url}: more than {max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise FetchError(f"{url}: took longer than {timeout_s:g} s", transient=True)
                        write(chunk)
                    return dict(r.headers)
            raise FetchError(f"{url}: too many redirects")
    except httpx.HTTPError as exc:  # connection refused/reset, DNS, read stall...
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}",
                         transient=not isinstance(exc, httpx.UnsupportedProtocol)) from exc


def fetch_bytes(url: str, max_bytes: int, timeout_s: float, connect_timeout_s: float = 20.0,
                allowed: tuple[str, ...] = HTTP_SCHEMES) -> bytes:
    """A small document (a feed) over http(s), in memory, within the bounds."""
    buf = io.BytesIO()
    _http_stream(url, buf.write, max_bytes, timeout_s, connect_timeout_s, allowed)
    return buf.getvalue()


def download(url: str, cache_dir: str | Path, cfg: FetchConfig | None = None, suffix: str = "",
             allowed: tuple[str, ...] = HTTP_SCHEMES) -> Path:
    """An http(s) file into the cache (reused if a complete copy is already there); returns its path."""
    cfg = cfg or FetchConfig()
    check_scheme(url, allowed)
    dest = Path(cache_dir) / cache_name(url, suffix)
    if dest.exists():
        return dest
    return _atomic_fill(dest, lambda f: _http_stream(url, f.write, cfg.max_bytes, cfg.timeout_s,
                                                     cfg.connect_timeout_s, allowed, cfg.allow_private_redirects))


def copy_fsspec(uri: str, cache_dir: str | Path, cfg: FetchConfig | None = None) -> Path:
    """A file from any fsspec filesystem into the cache, at most `max_bytes` and `timeout_s`."""
    import fsspec

    cfg = cfg or FetchConfig()
    fs, path = fsspec.core.url_to_fs(uri)
    size = fs.size(path)
    if size is not None and size > cfg.max_bytes:
        raise FetchError(f"{uri}: {size} bytes > limit {cfg.max_bytes}")
    dest = Path(cache_dir) / cache_name(uri)
    if dest.exists() and dest.stat().st_size == size:
        return dest

    def fill(out: io.BufferedWriter) -> None:
        deadline, got = time.monotonic() + cfg.timeout_s, 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                got += len(chunk)
                if got > cfg.max_bytes:
                    raise FetchError(f"{uri}: more than {cfg.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"{uri}: took longer than {cfg.timeout_s:g} s")
                out.write(chunk)

    return _atomic_fill(dest, fill)


def expand_local(sources: list[str]) -> list[Source]:
    """Files as given; folders walked for audio/video files; globs expanded. Sorted, without duplicates."""
    found: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
        elif p.exists():
            found.append(str(p))
        else:
            found += [f for f in sorted(glob.glob(src, recursive=True)) if os.path.isfile(f)]
    return [Source(uri=Path(f).resolve().as_uri(), path=f) for f in dict.fromkeys(found)]


def expand_fsspec(uri: str) -> list[str]:
    """An fsspec URI -> file URIs: a glob expanded, a folder walked for audio/video, a file as is."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if GLOB_CHARS & set(path):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if Path(p).suffix.lower() in AUDIO_SUFFIXES)
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(uri)
    return [fs.unstrip_protocol(p) for p in paths]


def is_manifest(uri: str) -> bool:
    return Path(urlparse(uri).path if scheme_of(uri) else uri).suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(uri: str, keep_duration: bool = False) -> list[dict[str, Any]]:
    """Rows of a .csv or .parquet source list: a `uri` column (required) and optional feed, title, published,
    guid, url columns kept as metadata. A relative `uri` is relative to the manifest's folder. With
    `keep_duration`, an optional `duration` column (seconds) is kept as a float (fan-out plans by hours)."""
    import fsspec

    suffix = Path(urlparse(uri).path if scheme_of(uri) else uri).suffix.lower()
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    if rows and "uri" not in rows[0]:
        raise ValueError(f"{uri}: a source manifest needs a `uri` column (has {sorted(rows[0])})")
    base = uri.rsplit("/", 1)[0] if scheme_of(uri) else str(Path(uri).resolve().parent)
    out = []
    for row in rows:
        target = str(row.get("uri") or "").strip()
        if not target:
            continue
        if not scheme_of(target) and not os.path.isabs(target):
            target = posixpath.join(base, target) if scheme_of(uri) else str(Path(base) / target)
        meta: dict[str, Any] = {k: str(row[k]) for k in META_COLUMNS if row.get(k) not in (None, "")}
        if keep_duration and row.get("duration") not in (None, ""):
            meta["duration"] = float(row["duration"])
        out.append({"uri": target, **meta})
    return out


def resolve_sources(sources: list[str], cache_dir: str | Path, cfg: FetchConfig | None = None) -> Resolved:
    """Every SOURCE -> local files (downloading remote ones into `cache_dir`). A source that cannot be
    resolved is listed in `failures` and the others go on."""
    cfg = cfg or FetchConfig()
    out = Resolved()
    rows: list[dict[str, str]] = []
    for src in sources:
        if is_manifest(src):
            try:
                rows += read_manifest(src)
            except Exception as exc:  # noqa: BLE001 - reported, the other sources go on
                out.failures.append((src, f"{type(exc).__name__}: {exc}"))
        else:
            rows.append({"uri": src})
    for row in rows:
        uri, meta = row["uri"], {k: v for k, v in row.items() if k not in ("uri", "duration")}
        scheme = scheme_of(uri)
        try:
            if scheme in ("", "file"):
                local = unquote(urlparse(uri).path) if scheme == "file" else uri
                found = expand_local([local])
                if not found:
                    raise FileNotFoundError(f"no audio files at {uri}")
                out.sources += [s.model_copy(update={"meta": {**s.meta, **meta}}) for s in found]
            elif scheme in HTTP_SCHEMES:
                path = download(uri, cache_dir, cfg)
                out.downloaded.append(path)
                out.sources.append(Source(uri=uri, path=str(path), meta={"url": uri, **meta}))
            else:
                for file_uri in expand_fsspec(uri):
                    path = copy_fsspec(file_uri, cache_dir, cfg)
                    out.downloaded.append(path)
                    out.sources.append(Source(uri=file_uri, path=str(path), meta=dict(meta)))
        except Exception as exc:  # noqa: BLE001 - reported, the other sources go on
            out.failures.append((uri, f"{type(exc).__name__}: {exc}"))
    unique: dict[str, Source] = {}
    for s in out.sources:
        unique.setdefault(s.uri, s)
    out.sources = list(unique.values())
    return out


def remove_downloads(paths: list[Path]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)
