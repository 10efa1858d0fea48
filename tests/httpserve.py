"""A local HTTP server for tests: serves a folder, plus a few misbehaving routes."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(SimpleHTTPRequestHandler):
    """Files from `directory`, and:
    /redirect?to=URL  302 to URL          /slow            drips bytes for ever (no Content-Length)
    /huge             claims 10 GB        /nolength?n=N    N bytes without a Content-Length
    """

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, _, query = self.path.partition("?")
        args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", args["to"])
            self.end_headers()
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024**3))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"\0" * 1024)
        elif path == "/nolength":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"\0" * int(args.get("n", "1000")))
            self.close_connection = True
        elif path == "/slow":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(600):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.05)
            self.close_connection = True
        else:
            super().do_GET()


@contextlib.contextmanager
def serve(directory: str | Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `directory` on a free port; yields the base URL (no trailing slash)."""
    server = ThreadingHTTPServer((host, 0), functools.partial(Handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def rss(episodes: list[dict], title: str = "Test podcast") -> str:
    """An RSS 2.0 feed; each episode: guid, title, url, pubDate (RFC 822), optional type and length."""
    items = "".join(
        f"<item><title>{e['title']}</title><guid isPermaLink=\"false\">{e['guid']}</guid>"
        f"<pubDate>{e.get('pubDate', 'Mon, 06 Jan 2025 10:00:00 +0000')}</pubDate>"
        f"<link>{e.get('link', '')}</link>"
        f"<enclosure url=\"{e['url']}\" type=\"{e.get('type', 'audio/mpeg')}\" length=\"{e.get('length', 0)}\"/></item>"
        for e in episodes)
    return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><rss version=\"2.0\"><channel><title>{title}</title>"
            f"<link>https://example.com/</link><description>test</description>{items}</channel></rss>")
