"""A real binary cache for tests: a signing key, a `file://` store and an HTTP server.

The Nix binary cache protocol is static files, so `nix copy --to file://DIR` fills the
cache and a plain static file server on 127.0.0.1 serves it to the test fleet's hosts
(they share this machine's network). `stop()` takes the server down mid-run.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import override


class _Quiet(http.server.SimpleHTTPRequestHandler):
    @override
    def log_message(self, format: str, *args: Any) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]


@dataclass
class BinaryCache:
    directory: Path
    secret_key: Path
    public_key: str
    server: http.server.ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None
    requests: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, directory: Path, name: str = "waggle-test-cache-1") -> BinaryCache:
        directory.mkdir(parents=True, exist_ok=True)
        secret, public = directory / "cache.sec", directory / "cache.pub"
        subprocess.run(
            ["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)],
            check=True,
            timeout=30,
        )
        store = directory / "store"
        store.mkdir()
        return cls(store, secret, public.read_text().strip())

    @property
    def file_url(self) -> str:
        return f"file://{self.directory}"

    @property
    def http_url(self) -> str:
        assert self.server is not None, "start() first"
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> BinaryCache:
        handler = functools.partial(_Quiet, directory=str(self.directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.requests = self.requests  # type: ignore[attr-defined]
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Take the server down: connections to its port are refused from now on."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.thread = None

    def narinfos(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob("*.narinfo"))

    def __enter__(self) -> BinaryCache:  # noqa: PYI034 - a dataclass, not subclassed
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
