"""Sticky PR/MR comments against a real HTTP server on 127.0.0.1 (runner.gitops.comments)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typing_extensions import override

from runner.errors import UsageError
from runner.gitops.ci import CiContext
from runner.gitops.comments import (
    GITHUB_BODY_LIMIT,
    MARKER,
    CommentError,
    ForgeToken,
    fit_body,
    token_from_env,
    upsert_comment,
)
from tests.markdown_fences import fenced_blocks

TOKEN = "ghp_s3cr3t-token-value"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[str, str, Any], Answer]


@dataclass
class Forge:
    url: str
    requests: list[Seen]


@pytest.fixture
def forge() -> Iterator[Callable[[Route], Forge]]:
    """Start a recording HTTP server on 127.0.0.1 with a route function; always shut down."""
    servers: list[ThreadingHTTPServer] = []

    def start(route: Route) -> Forge:
        requests: list[Seen] = []

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                headers = {
                    k.lower(): v for k, v in self.headers.items()
                }  # names are case-insensitive
                requests.append(Seen(self.command, self.path, headers, body))
                answer = route(self.command, self.path, body)
                data = json.dumps(answer.body).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in answer.headers.items():
                    self.send_header(name, value.replace("{url}", forge_url))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = _handle  # noqa: N815

            @override
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        forge_url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return Forge(forge_url, requests)

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def github_ctx(url: str, **changes: Any) -> CiContext:
    values: dict[str, Any] = {
        "event_name": "pull_request",
        "number": 7,
        "repository": "acme/fleet",
        "api_url": url + "/api/v3",
        "forge": "github",
    }
    values.update(changes)
    return CiContext("github", "pull_request", **values)


def gitlab_ctx(url: str, **changes: Any) -> CiContext:
    values: dict[str, Any] = {
        "event_name": "merge_request_event",
        "number": 5,
        "project_id": "12",
        "api_url": url + "/api/v4",
        "forge": "gitlab",
    }
    values.update(changes)
    return CiContext("gitlab", "pull_request", **values)


def assert_github_headers(seen: Seen) -> None:
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["accept"] == "application/vnd.github+json"
    assert seen.headers["user-agent"].startswith("waggle/")


# -- GitHub ----------------------------------------------------------------------------


def test_github_updates_the_marked_comment_on_page_two(forge):
    comments = "/api/v3/repos/acme/fleet/issues/7/comments"

    def route(method: str, path: str, body: Any) -> Answer:
        if method == "GET" and path == f"{comments}?per_page=100":
            link = (
                f'<{{url}}{comments}?per_page=100&page=2>; rel="next", '
                f'<{{url}}{comments}?per_page=100&page=2>; rel="last"'
            )
            return Answer(
                body=[{"id": 1, "body": "looks good"}, {"id": 2, "body": None}],
                headers={"Link": link},
            )
        if method == "GET" and path == f"{comments}?per_page=100&page=2":
            return Answer(
                body=[{"id": 3, "body": "other"}, {"id": 4, "body": f"{MARKER}\nold plan"}],
                headers={"Link": f'<{{url}}{comments}?per_page=100>; rel="first"'},
            )
        if method == "PATCH" and path == "/api/v3/repos/acme/fleet/issues/comments/4":
            return Answer(body={"id": 4, "body": body["body"]})
        return Answer(404, {"message": "Not Found"})

    server = forge(route)
    result = upsert_comment(github_ctx(server.url), "## new plan", token=TOKEN)
    assert result == "updated"
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", f"{comments}?per_page=100"),
        ("GET", f"{comments}?per_page=100&page=2"),
        ("PATCH", "/api/v3/repos/acme/fleet/issues/comments/4"),
    ]
    for seen in server.requests:
        assert_github_headers(seen)
    patch = server.requests[-1]
    assert patch.headers["content-type"] == "application/json"
    assert patch.body == {"body": f"{MARKER}\n## new plan"}


def test_github_creates_a_comment_when_none_is_marked(forge):
    comments = "/api/v3/repos/acme/fleet/issues/7/comments"

    def route(method: str, path: str, body: Any) -> Answer:
        if method == "GET":
            return Answer(body=[{"id": 1, "body": "no marker here"}])
        if method == "POST" and path == comments:
            return Answer(201, {"id": 9, "body": body["body"]})
        return Answer(404, {"message": "Not Found"})

    server = forge(route)
    body = f"{MARKER}\nplan with its own marker"
    assert upsert_comment(github_ctx(server.url), body, token=TOKEN) == "created"
    post = server.requests[-1]
    assert (post.method, post.path) == ("POST", comments)
    assert_github_headers(post)
    assert post.body == {"body": body}  # the marker is not added twice


def test_github_error_has_status_and_no_token(forge):
    def route(method: str, path: str, body: Any) -> Answer:
        return Answer(401, {"message": f"Bad credentials for {TOKEN}"})

    server = forge(route)
    with pytest.raises(CommentError) as info:
        upsert_comment(github_ctx(server.url), "plan", token=TOKEN)
    text = str(info.value)
    assert info.value.status == 401
    assert "HTTP 401" in text
    assert "GET /api/v3/repos/acme/fleet/issues/7/comments" in text
    assert TOKEN not in text
    assert TOKEN not in info.value.detail
    assert "Bad credentials" in text


def test_github_body_is_capped(forge):
    def route(method: str, path: str, body: Any) -> Answer:
        return Answer(body=[]) if method == "GET" else Answer(201, {"id": 1})

    server = forge(route)
    big = "| row |\n" * 20000 + "```\n" + "x\n" * 10000
    assert upsert_comment(github_ctx(server.url), big, token=TOKEN) == "created"
    sent = server.requests[-1].body["body"]
    assert len(sent) <= GITHUB_BODY_LIMIT
    assert sent.startswith(MARKER)
    assert "cut to fit" in sent


def test_fork_pull_requests_get_no_comment_without_opt_in(forge):
    def route(method: str, path: str, body: Any) -> Answer:
        return Answer(body=[]) if method == "GET" else Answer(201, {"id": 1})

    server = forge(route)
    ctx = github_ctx(server.url, fork=True)
    assert upsert_comment(ctx, "plan", token=TOKEN) == "skipped"
    assert server.requests == []
    assert upsert_comment(ctx, "plan", token=TOKEN, allow_fork=True) == "created"


def test_link_to_another_host_is_refused(forge):
    def route(method: str, path: str, body: Any) -> Answer:
        return Answer(body=[], headers={"Link": '<http://127.0.0.2:1/steal>; rel="next"'})

    server = forge(route)
    with pytest.raises(CommentError, match="refusing to send the token"):
        upsert_comment(github_ctx(server.url), "plan", token=TOKEN)
    assert len(server.requests) == 1


def test_unreachable_api_is_a_comment_error():
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(CommentError) as info:
        upsert_comment(github_ctx(f"http://127.0.0.1:{free}"), "plan", token=TOKEN, timeout=5)
    assert TOKEN not in str(info.value)


def test_not_a_pull_request():
    ctx = CiContext("github", "push", api_url="http://127.0.0.1:1", forge="github")
    with pytest.raises(UsageError, match="not for a pull or merge request"):
        upsert_comment(ctx, "plan", token=TOKEN)


# -- GitLab ----------------------------------------------------------------------------


def test_gitlab_updates_the_marked_note(forge):
    notes = "/api/v4/projects/12/merge_requests/5/notes"

    def route(method: str, path: str, body: Any) -> Answer:
        if method == "GET" and "page=2" not in path:
            return Answer(
                body=[
                    {"id": 30, "body": f"{MARKER} mentioned by the system", "system": True},
                    {"id": 31, "body": "hi"},
                ],
                headers={"X-Next-Page": "2"},
            )
        if method == "GET":
            return Answer(body=[{"id": 32, "body": f"{MARKER}\nold"}], headers={"X-Next-Page": ""})
        if method == "PUT" and path == f"{notes}/32":
            return Answer(body={"id": 32})
        return Answer(404, {"message": "404 Not found"})

    server = forge(route)
    ctx = gitlab_ctx(server.url)
    assert upsert_comment(ctx, "new plan", token=TOKEN) == "updated"
    methods = [(r.method, r.path.split("?")[0]) for r in server.requests]
    assert methods == [("GET", notes), ("GET", notes), ("PUT", f"{notes}/32")]
    assert "page=2" in server.requests[1].path
    for seen in server.requests:
        assert seen.headers["private-token"] == TOKEN
        assert "authorization" not in seen.headers
    assert server.requests[-1].body == {"body": f"{MARKER}\nnew plan"}


def test_gitlab_creates_a_note_with_job_token(forge):
    def route(method: str, path: str, body: Any) -> Answer:
        return Answer(body=[]) if method == "GET" else Answer(201, {"id": 40})

    server = forge(route)
    ctx = gitlab_ctx(server.url, project_id="acme/fleet")
    result = upsert_comment(ctx, "plan", token=TOKEN, token_header="JOB-TOKEN")
    assert result == "created"
    post = server.requests[-1]
    assert (post.method, post.path) == (
        "POST",
        "/api/v4/projects/acme%2Ffleet/merge_requests/5/notes",
    )
    assert post.headers["job-token"] == TOKEN
    assert "private-token" not in post.headers
    assert post.body == {"body": f"{MARKER}\nplan"}


def test_gitlab_error(forge):
    server = forge(lambda method, path, body: Answer(403, {"message": "403 Forbidden"}))
    with pytest.raises(CommentError) as info:
        upsert_comment(gitlab_ctx(server.url), "plan", token=TOKEN)
    assert info.value.status == 403
    assert "GitLab API GET /api/v4/projects/12/merge_requests/5/notes" in str(info.value)
    assert TOKEN not in str(info.value)


# -- helpers ---------------------------------------------------------------------------


def test_token_from_env():
    gh = CiContext("github", "pull_request", forge="github")
    gl = CiContext("gitlab", "pull_request", forge="gitlab")
    assert token_from_env(gh, {"GITHUB_TOKEN": "t"}) == ForgeToken(
        "t", "PRIVATE-TOKEN", "GITHUB_TOKEN"
    )
    assert token_from_env(gh, {}) is None
    assert token_from_env(gh, {"MINE": "m"}, "MINE") == ForgeToken("m", "PRIVATE-TOKEN", "MINE")
    assert token_from_env(gl, {"CI_JOB_TOKEN": "j"}) == ForgeToken("j", "JOB-TOKEN", "CI_JOB_TOKEN")
    both = {"CI_JOB_TOKEN": "j", "GITLAB_TOKEN": "p"}
    assert token_from_env(gl, both) == ForgeToken("p", "PRIVATE-TOKEN", "GITLAB_TOKEN")


def test_fit_body():
    assert fit_body("plan", MARKER, 100) == f"{MARKER}\nplan"
    text = fit_body("```\n" + "line\n" * 100, MARKER, 200)
    assert len(text) <= 200
    assert text.count("```") % 2 == 0  # the code block is closed


def test_fit_body_closes_a_longer_fence_it_cuts_into():
    """A code block opened with four backticks (it holds ``` itself) is closed with four."""
    body = "### beta\n\n````\n" + "```\n## not a heading\n" * 200 + "````\n\nafter\n"
    text = fit_body(body, MARKER, 1000)
    assert len(text) <= 1000
    blocks, outside = fenced_blocks(text)
    assert len(blocks) == 1
    assert not any("not a heading" in line for line in outside), text
    assert any("cut to fit" in line for line in outside), text  # the note is not in the block
