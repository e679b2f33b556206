"""deployment.healthChecks: morph's cmd and http checks, run after activation.

`run_health_checks(host, checks, default_host=..., on_line=...)` runs every check of a node
at once and returns "N health checks passed", or raises `HealthCheckError` naming the first
check that failed, with its last output as detail. The others are then cancelled.

- A cmd check runs its argv on the host through `Host.run` (each argument quoted, as root:
  through privilegeEscalationCommand when targetUser is not root); exit status 0 passes.
- An http check is a GET from the deploying machine (urllib, in a thread of its own per
  try) to `scheme://host:port/path`, `host` defaulting to `default_host` (the node's
  targetHost). A 2xx answer passes. https certificates are verified against the system's
  CAs unless insecureSSL. No proxy is used (http_proxy and friends are ignored) and a
  redirect is followed only to the same host, so a check never talks to another machine.

Each check is tried, and after a failed try tried again `period` seconds later, until it
passes or `timeout` seconds have gone by since its first try; a try that starts when the
time is (nearly) spent still gets `LAST_TRY` seconds. So a check never takes longer than
`timeout + LAST_TRY` seconds (plus `SSH_GRACE` when the SSH connection itself hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, TypeVar
from urllib.parse import urlsplit

from runner.errors import WaggleError
from runner.hive.model import CmdCheck, HealthChecks, HttpCheck
from runner.hosts import Host
from runner.redirects import RedirectsWithin

LAST_TRY = 1.0  # seconds a try gets at least, even when the check's time is spent
SSH_GRACE = 1.0  # beyond a cmd try's own timeout, for an SSH connection that hangs
BODY_LIMIT = 4096  # bytes of a failing answer kept as detail

LineCallback = Callable[[str], None]
_T = TypeVar("_T")


class HealthCheckError(WaggleError):
    """A health check did not pass within its timeout; the node fails (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, *, detail: str = "", check: str = "") -> None:
        super().__init__(message, detail=detail)
        self.check = check  # the failed check's description


@dataclass(frozen=True)
class _Try:
    ok: bool
    reason: str  # one line: "exit status 3: inactive", "http://h:80/ answered 503"
    detail: str = ""


async def run_health_checks(
    host: Host,
    checks: HealthChecks,
    *,
    default_host: str,
    on_line: LineCallback | None = None,
) -> str:
    """Run every check at once; "N health checks passed" or HealthCheckError for the first
    that failed (the others are cancelled)."""
    say: LineCallback = on_line if on_line is not None else (lambda _line: None)
    if checks.empty:
        return "no health checks"
    if checks.http and not default_host and any(c.host is None for c in checks.http):
        first = next(c for c in checks.http if c.host is None)
        raise HealthCheckError(
            f"health check {_name(first)} has no host to ask: set its host or targetHost",
            check=first.description,
        )
    runs: list[asyncio.Task[None]] = []
    for cmd in checks.cmd:
        runs.append(asyncio.create_task(_until_passed(cmd, _cmd_try(host, cmd), say)))
    for get in checks.http:
        runs.append(asyncio.create_task(_until_passed(get, _http_try(get, default_host), say)))
    try:
        pending: set[asyncio.Task[None]] = set(runs)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in runs if t.done() and not t.cancelled() and t.exception()]
            if failed:
                error = failed[0].exception()
                assert error is not None
                raise error
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    count = len(checks)
    return f"{count} health check{'' if count == 1 else 's'} passed"


def _name(check: CmdCheck | HttpCheck) -> str:
    return "'" + " ".join(check.description.split()) + "'"


def _secs(seconds: float) -> str:
    """5.02 -> "5", 1.53 -> "1.5", 0.04 -> "0"."""
    rounded = round(seconds, 1)
    return f"{rounded:.0f}" if rounded >= 10 or rounded == int(rounded) else f"{rounded:.1f}"


async def _until_passed(
    check: CmdCheck | HttpCheck,
    attempt: Callable[[float], Awaitable[_Try]],
    say: LineCallback,
) -> None:
    """Try `check` every `period` s until it passes or `timeout` s are spent."""
    start = time.monotonic()
    deadline = start + check.timeout
    last_try = min(LAST_TRY, check.timeout)
    tries = 0
    while True:
        tries += 1
        budget = max(deadline - time.monotonic(), last_try)
        result: _Try = await attempt(budget)
        elapsed = time.monotonic() - start
        if result.ok:
            again = f" on try {tries}" if tries > 1 else ""
            say(f"health check {_name(check)} passed{again} ({_secs(elapsed)} s)")
            return
        left = deadline - time.monotonic()
        if left <= 0:
            # "after 5 s": its timeout, spent; the time measured is in the detail.
            tried = f"{tries} tries" if tries > 1 else "1 try"
            raise HealthCheckError(
                f"health check {_name(check)} failed after {_secs(check.timeout)} s:"
                f" {result.reason}",
                detail=f"{result.detail}\n({tried} in {elapsed:.1f} s)".lstrip("\n"),
                check=check.description,
            )
        wait = min(check.period, left)
        say(
            f"health check {_name(check)}: try {tries} failed: {result.reason};"
            f" next try in {_secs(wait)} s"
        )
        await asyncio.sleep(wait)


# -- cmd checks: on the host --------------------------------------------------------------


def _cmd_try(host: Host, check: CmdCheck) -> Callable[[float], Awaitable[_Try]]:
    async def attempt(budget: float) -> _Try:
        try:
            done = await asyncio.wait_for(
                host.run(check.cmd, timeout=budget, privileged=True), budget + SSH_GRACE
            )
        except TimeoutError:
            return _Try(False, f"no answer from the host within {_secs(budget)} s")
        except WaggleError as e:  # e.g. the host cannot be reached any more
            return _Try(False, e.message, e.detail)
        output = "\n".join(s for s in (done.stdout.strip(), done.stderr.strip()) if s)
        if done.ok:
            return _Try(True, "exit status 0", output)
        return _Try(False, done.describe(), output)

    return attempt


# -- http checks: from the deployer -------------------------------------------------------


def _http_try(check: HttpCheck, default_host: str) -> Callable[[float], Awaitable[_Try]]:
    url = check.url(default_host)
    host = urlsplit(url).hostname or ""

    async def attempt(budget: float) -> _Try:
        try:
            return await asyncio.wait_for(
                _in_thread(lambda: _get(url, host, check, budget)), budget
            )
        except TimeoutError:
            return _Try(False, f"{url}: no answer within {_secs(budget)} s")

    return attempt


async def _in_thread(work: Callable[[], _T]) -> _T:
    """`work()` in a new daemon thread, awaited without blocking the event loop.

    Not asyncio.to_thread: its executor has few workers (min(32, CPUs + 4)), so the checks
    of many hosts would wait for each other and overrun their timeouts, and a try abandoned
    at its timeout would hold a worker until its socket gives up.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        try:
            value = work()
        except Exception as e:  # noqa: BLE001 (handed to the awaiting task, not swallowed)
            outcome = functools.partial(_settle, future, None, e)
        else:
            outcome = functools.partial(_settle, future, value, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(outcome)

    threading.Thread(target=run, name="waggle-health-check", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[_T], value: _T | None, error: Exception | None) -> None:
    if future.done():  # the try was abandoned at its timeout
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)  # type: ignore[arg-type]


def _same_host(host: str) -> Callable[[str], bool]:
    """Redirects are followed only to the check's own host (over http or https)."""

    def allowed(url: str) -> bool:
        target = urlsplit(url)
        return target.scheme in ("http", "https") and (target.hostname or "") == host.lower()

    return allowed


@functools.cache
def _tls_context(insecure: bool) -> ssl.SSLContext:
    """One context of each kind per process: loading the system's CAs takes a while."""
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _get(url: str, host: str, check: HttpCheck, timeout: float) -> _Try:
    """One GET (in a thread): 2xx passes; anything else fails with a one-line reason."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # never a proxy: only the check's host is asked
        urllib.request.HTTPSHandler(context=_tls_context(check.insecure_ssl)),
        RedirectsWithin(_same_host(host)),
    )
    request = urllib.request.Request(url, headers=dict(check.headers), method="GET")
    try:
        with opener.open(request, timeout=timeout) as answer:
            status = int(answer.status)
            body = answer.read(BODY_LIMIT)
            where = answer.geturl()
    except urllib.error.HTTPError as e:  # a non-2xx answer (3xx: a redirect not followed)
        try:
            status, where = e.code, e.geturl() or url
            body = _read_quietly(e)
            location = e.headers.get("Location") if e.headers is not None else None
        finally:
            e.close()
        if 300 <= status < 400 and location:
            return _Try(False, f"{where} answered {status} (redirect to {location} not followed)")
        return _Try(False, f"{where} answered {status}", _text(body))
    except urllib.error.URLError as e:
        return _Try(False, f"{url}: {_reason(e.reason, timeout)}")
    except (OSError, http.client.HTTPException, ValueError) as e:
        return _Try(False, f"{url}: {_reason(e, timeout)}")
    if 200 <= status < 300:
        return _Try(True, f"{where} answered {status}", _text(body))
    return _Try(False, f"{where} answered {status}", _text(body))


def _read_quietly(answer: IO[bytes]) -> bytes:
    try:
        return answer.read(BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        return b""


def _text(body: bytes) -> str:
    return body.decode(errors="replace").strip()


def _reason(error: object, timeout: float) -> str:
    """One line for a failed connection or request."""
    if isinstance(error, TimeoutError):
        return f"no answer within {_secs(timeout)} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {error.verify_message or error.reason}"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror}"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    text = " ".join(str(error).split())
    return text or type(error).__name__
