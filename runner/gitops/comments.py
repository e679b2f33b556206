"""One sticky plan comment per pull/merge request, updated in place.

The comment starts with a marker (`<!-- waggle-plan -->`); `upsert_comment` lists the
PR's comments (GitHub) or the MR's notes (GitLab), every page, and edits the first one that
holds the marker, or creates one. Only `urllib.request`, with a timeout on every request.
The token goes only to the API's own host: links and redirects to another host are refused.
Errors name the method, the path and the HTTP status, never the token.

A pull request from a fork gets no comment unless the caller opts in (`allow_fork`):
GitHub gives such runs a read-only token, and a forge token must not be handed to code
from a fork.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from runner import __version__
from runner.errors import UsageError, WaggleError
from runner.gitops.ci import CiContext
from runner.redirects import RedirectsWithin
from runner.report.markdown import open_fence

MARKER = "<!-- waggle-plan -->"
GITHUB_BODY_LIMIT = 65536  # "Body is too long (maximum is 65536 characters)"
GITLAB_BODY_LIMIT = 1_000_000  # GitLab notes: 1,000,000 characters
MAX_PAGES = 50
TokenHeader = Literal["PRIVATE-TOKEN", "JOB-TOKEN"]
Outcome = Literal["created", "updated", "skipped"]
_TRUNCATED = (
    "\n\n_… cut to fit the comment size limit; the full report is in the job's artifacts._\n"
)
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class CommentError(WaggleError):
    """The forge API refused or could not be reached; `status` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ForgeToken:
    value: str
    header: TokenHeader = "PRIVATE-TOKEN"  # GitLab only; GitHub always sends Bearer
    source: str = ""  # the environment variable it came from


def token_from_env(
    ctx: CiContext, env: Mapping[str, str], name: str | None = None
) -> ForgeToken | None:
    """The API token for comments: `name` if given (the `token_env` setting), else
    GITHUB_TOKEN / GH_TOKEN on GitHub, WAGGLE_GITLAB_TOKEN / GITLAB_TOKEN on GitLab (a
    project or group access token with `api` scope; CI_JOB_TOKEN, the last resort, cannot
    write MR notes on most GitLab versions)."""
    if ctx.forge == "gitlab":
        names = [name] if name else ["WAGGLE_GITLAB_TOKEN", "GITLAB_TOKEN", "CI_JOB_TOKEN"]
    else:
        names = [name] if name else ["GITHUB_TOKEN", "GH_TOKEN"]
    for var in names:
        value = env.get(var, "").strip()
        if value:
            header: TokenHeader = "JOB-TOKEN" if var == "CI_JOB_TOKEN" else "PRIVATE-TOKEN"
            return ForgeToken(value, header, var)
    return None


def fit_body(body: str, marker: str, limit: int) -> str:
    """`body` with `marker` as its first line, cut (with a note) to `limit` characters."""
    text = body if marker in body else f"{marker}\n{body}"
    if len(text) <= limit:
        return text
    kept = text[: max(0, limit - len(_TRUNCATED))]
    while True:  # whole lines only, and a code block the cut ends in is closed
        if "\n" in kept[len(marker) :]:
            kept = kept[: kept.rfind("\n")]
        fence = open_fence(kept)
        closing = f"\n{fence}" if fence else ""
        if len(kept) + len(closing) + len(_TRUNCATED) <= limit or "\n" not in kept[len(marker) :]:
            return kept + closing + _TRUNCATED


def upsert_comment(
    ctx: CiContext,
    body: str,
    *,
    token: str,
    marker: str = MARKER,
    timeout: float = 30,
    allow_fork: bool = False,
    token_header: TokenHeader = "PRIVATE-TOKEN",
) -> Outcome:
    """Create or update the PR/MR comment holding `marker`; "skipped" for a fork PR
    without `allow_fork`. Raises UsageError if the context has no PR or API, and
    CommentError if the API fails."""
    if not ctx.is_pull_request or ctx.number is None:
        raise UsageError("cannot comment: this run is not for a pull or merge request")
    if ctx.fork and not allow_fork:
        return "skipped"
    if not token:
        raise UsageError("cannot comment: no API token (set GITHUB_TOKEN or the token_env)")
    if not ctx.api_url or ctx.forge is None:
        raise UsageError(f"cannot comment: no forge API known for {ctx.provider}")
    api = _Api(ctx.api_url, token, timeout, ctx.forge, token_header)
    if ctx.forge == "github":
        if not ctx.repository:
            raise UsageError("cannot comment: the repository (GITHUB_REPOSITORY) is unknown")
        text = fit_body(body, marker, GITHUB_BODY_LIMIT)
        repo = "/".join(quote(p, safe="") for p in ctx.repository.split("/"))
        issue = f"/repos/{repo}/issues/{ctx.number}"
        for item in api.pages(f"{issue}/comments?per_page=100"):
            if marker in str(item.get("body") or ""):
                api.call("PATCH", f"/repos/{repo}/issues/comments/{item['id']}", {"body": text})
                return "updated"
        api.call("POST", f"{issue}/comments", {"body": text})
        return "created"
    if not ctx.project_id:
        raise UsageError("cannot comment: the GitLab project id (CI_PROJECT_ID) is unknown")
    text = fit_body(body, marker, GITLAB_BODY_LIMIT)
    notes = f"/projects/{quote(ctx.project_id, safe='')}/merge_requests/{ctx.number}/notes"
    for item in api.pages(f"{notes}?per_page=100&sort=asc&order_by=created_at"):
        if not item.get("system") and marker in str(item.get("body") or ""):
            api.call("PUT", f"{notes}/{item['id']}", {"body": text})
            return "updated"
    api.call("POST", notes, {"body": text})
    return "created"


class _Api:
    def __init__(
        self, root: str, token: str, timeout: float, forge: str, token_header: TokenHeader
    ) -> None:
        self.root = root.rstrip("/")
        self.netloc = urlsplit(self.root).netloc
        self.token = token
        self.timeout = timeout
        self.name = "GitHub" if forge == "github" else "GitLab"
        self.headers = {"User-Agent": f"waggle/{__version__}", "Accept": "application/json"}
        if forge == "github":
            self.headers["Accept"] = "application/vnd.github+json"
            self.headers["X-GitHub-Api-Version"] = "2022-11-28"
            self.headers["Authorization"] = f"Bearer {token}"
        else:
            self.headers[token_header] = token
        netloc = self.netloc
        handlers: list[urllib.request.BaseHandler] = [
            RedirectsWithin(lambda url: urlsplit(url).netloc == netloc)
        ]
        if urlsplit(self.root).hostname in ("127.0.0.1", "localhost", "::1"):
            handlers.append(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        self.opener = urllib.request.build_opener(*handlers)

    def _clean(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    def _show(self, url: str) -> str:
        parts = urlsplit(url)
        return self._clean(parts.path)

    def call(
        self, method: str, path_or_url: str, payload: object | None = None
    ) -> tuple[Any, Message]:
        url = path_or_url if "://" in path_or_url else self.root + path_or_url
        if urlsplit(url).netloc != self.netloc:
            raise CommentError(f"{self.name} API: refusing to send the token to {url!r}")
        data = json.dumps(payload).encode("utf-8") if payload is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        where = f"{self.name} API {method} {self._show(url)}"
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
                response_headers = response.headers
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                body = json.loads(e.read() or b"null")
                message = body.get("message") if isinstance(body, dict) else None
                detail = f": {self._clean(str(message))[:200]}" if message else ""
            except (ValueError, OSError):
                pass
            finally:
                e.close()
            raise CommentError(
                f"{where} failed: HTTP {e.code} {self._clean(str(e.reason))}{detail}",
                status=e.code,
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CommentError(f"{where} failed: {self._clean(str(reason))}") from None
        try:
            return (json.loads(raw) if raw.strip() else None), response_headers
        except ValueError:
            raise CommentError(f"{where}: the answer is not JSON") from None

    def pages(self, path: str) -> list[dict[str, Any]]:
        """Every item of a paginated list: Link rel="next" (GitHub, GitLab) or
        X-Next-Page (GitLab)."""
        items: list[dict[str, Any]] = []
        url: str | None = self.root + path
        for _ in range(MAX_PAGES):
            if url is None:
                break
            data, headers = self.call("GET", url)
            if not isinstance(data, list):
                raise CommentError(f"{self.name} API GET {self._show(url)}: expected a list")
            items += [d for d in data if isinstance(d, dict) and "id" in d]
            url = self._next(url, headers)
        return items

    def _next(self, url: str, headers: Message) -> str | None:
        match = _NEXT_LINK.search(headers.get("Link", "") or "")
        if match:
            return match.group(1)
        page = (headers.get("X-Next-Page") or "").strip()
        if page.isdigit():
            base = re.sub(r"([?&])page=\d+&?", r"\1", url).rstrip("?&")
            return f"{base}{'&' if '?' in base else '?'}page={page}"
        return None
