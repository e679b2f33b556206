"""HTTP redirects that never leave where a request was meant to go.

Used by the PR comment API client (a token must never reach another host) and by http
health checks (they talk only to the configured host).
"""

from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Callable
from typing import IO

from typing_extensions import override


class RedirectsWithin(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only when `allowed(new_url)`; otherwise the 3xx answer stands."""

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed

    @override
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not self.allowed(newurl):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)
