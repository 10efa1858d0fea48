"""Source resolution without Prefect: local paths, http(s), fsspec URIs and csv/parquet manifests."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.sources import FetchConfig, resolve_sources
from tests.httpserve import serve


def test_local_files_folders_globs_and_file_uris(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.wav", "sub/b.mp3", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    r = resolve_sources([str(tmp_path / "in"), str(tmp_path / "in" / "*.wav"),
                         (tmp_path / "in" / "sub" / "b.mp3").as_uri(), str(tmp_path / "missing.wav")],
                        tmp_path / "cache")
    assert sorted(Path(s.path).name for s in r.sources) == ["a.wav", "b.mp3"]  # no duplicates, no .txt
    assert all(s.uri.startswith("file://") for s in r.sources)
    assert r.downloaded == [] and not (tmp_path / "cache").exists()
    assert [u for u, _ in r.failures] == [str(tmp_path / "missing.wav")]


def test_http_url_is_downloaded_into_the_cache(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "talk.flac").write_bytes(b"fLaC" + b"\2" * 3000)
    with serve(tmp_path / "site") as base:
        r = resolve_sources([f"{base}/talk.flac", f"{base}/missing.flac"], tmp_path / "cache")
    assert len(r.sources) == 1 and r.sources[0].uri == f"{base}/talk.flac"
    assert Path(r.sources[0].path).read_bytes() == (tmp_path / "site" / "talk.flac").read_bytes()
    assert r.sources[0].meta == {"url": f"{base}/talk.flac"}
    assert r.downloaded == [Path(r.sources[0].path)]
    assert "404" in r.failures[0][1]


def test_memory_fsspec_uris_with_globs_and_size_bound(tmp_path: Path) -> None:
    root = f"memory://test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name, size in (("x/one.wav", 100), ("x/two.ogg", 200), ("x/readme.md", 10), ("big/huge.wav", 5000)):
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(b"\1" * size)
    r = resolve_sources([f"{root}/x", f"{root}/x/*.wav", f"{root}/big/huge.wav"], tmp_path / "cache",
                        FetchConfig(max_bytes=1000))
    assert sorted(s.uri.rsplit("/", 1)[-1] for s in r.sources) == ["one.wav", "two.ogg"]
    assert all(s.uri.startswith("memory://") for s in r.sources)
    assert sorted(Path(s.path).stat().st_size for s in r.sources) == [100, 200]
    assert len(r.failures) == 1 and "huge.wav" in r.failures[0][0] and "limit" in r.failures[0][1]


def test_csv_and_parquet_manifests(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("a.wav", "b.wav", "c.wav"):
        (audio / name).write_bytes(b"x")
    mem = f"memory://m-{uuid.uuid4().hex}/d.wav"
    with fsspec.open(mem, "wb") as f:
        f.write(b"y")
    (tmp_path / "list.csv").write_text("uri,title,guid\naudio/a.wav,First,guid-a\n"
                                       f"{(audio / 'b.wav').as_uri()},,\n\n")
    pq.write_table(pa.Table.from_pylist([{"uri": str(audio / "c.wav"), "feed": "f1"}, {"uri": mem, "feed": None}]),
                   tmp_path / "list.parquet")
    r = resolve_sources([str(tmp_path / "list.csv"), str(tmp_path / "list.parquet")], tmp_path / "cache")
    assert r.failures == []
    by_name = {s.uri.rsplit("/", 1)[-1]: s for s in r.sources}
    assert sorted(by_name) == ["a.wav", "b.wav", "c.wav", "d.wav"]
    assert by_name["a.wav"].meta == {"title": "First", "guid": "guid-a"}  # relative to the manifest's folder
    assert by_name["b.wav"].meta == {} and by_name["c.wav"].meta == {"feed": "f1"}
    assert Path(by_name["d.wav"].path).read_bytes() == b"y"
    # A manifest without a `uri` column is reported, not fatal.
    (tmp_path / "bad.csv").write_text("path\na.wav\n")
    r = resolve_sources([str(tmp_path / "bad.csv"), str(audio / "a.wav")], tmp_path / "cache")
    assert len(r.sources) == 1 and "uri" in r.failures[0][1]


def test_redirect_from_public_host_into_private_network_is_refused() -> None:
    from tasks.sources import FetchError, check_redirect, is_private_host

    assert is_private_host("http://127.0.0.1:8000/a") and is_private_host("http://10.1.2.3/")
    assert not is_private_host("http://93.184.216.34/feed.xml")
    with pytest.raises(FetchError, match="redirect to private address"):
        check_redirect("http://93.184.216.34/ep.mp3", "http://169.254.169.254/latest/meta-data")
    check_redirect("http://93.184.216.34/ep.mp3", "http://169.254.169.254/x", allow_private=True)
    check_redirect("http://127.0.0.1:8000/ep.mp3", "http://127.0.0.1:8000/real.mp3")  # a local server you chose
    check_redirect("http://93.184.216.34/ep.mp3", "http://93.184.216.35/cdn.mp3")
