"""deployment.healthChecks (runner/deploy/health.py, runner/hive/model.py, options.nix).

cmd checks run on a real fleet host (sshd, its own /run) through SshHost; http checks go to
real HTTP(S) servers this test starts on loopback addresses. The fleet tests need root; under
CI=true they must run. The option tests evaluate real hives against the nixpkgs stand-in.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typing_extensions import override

from runner.deploy.health import LAST_TRY, HealthCheckError, run_health_checks
from runner.errors import HiveError, WaggleError
from runner.hive.discovery import locate
from runner.hive.hive import Hive
from runner.hive.model import CmdCheck, HealthChecks, HttpCheck, NodeConfig
from runner.hosts.ssh import SshHost, SshSettings, SshTarget
from runner.nix import NixFlags
from tests.conftest import write_hive
from tests.fleet import Fleet, free_first_octet
from tests.helpers import assert_clean_error, waggle

NODE = "host1"
SLACK = 0.8  # scheduling and SSH round trips on a busy 2-core machine


# -- helpers ------------------------------------------------------------------------------


class NoHost:
    """A Host for http-only checks: any command on it is a test failure."""

    name = "nohost"

    async def run(self, argv, **_kw):
        raise AssertionError(f"an http check ran {argv} on the host")

    async def run_fed(self, argv, chunks, **_kw):
        raise AssertionError("unexpected")

    async def write_file(self, path, data, **_kw):
        raise AssertionError("unexpected")

    async def close(self) -> None:
        pass


def check_all(checks: HealthChecks, *, host=None, default_host: str = "127.0.0.1"):
    """(result or HealthCheckError, progress lines, seconds) of run_health_checks."""
    lines: list[str] = []

    async def main():
        return await run_health_checks(
            host or NoHost(), checks, default_host=default_host, on_line=lines.append
        )

    start = time.monotonic()
    try:
        outcome: str | HealthCheckError = asyncio.run(main())
    except HealthCheckError as e:
        outcome = e
    return outcome, lines, time.monotonic() - start


@dataclass
class Server:
    """A real HTTP(S) server on `address`, answering per `answer(path) -> (status, headers)`."""

    address: str
    answer: Callable[[str], tuple[int, dict[str, str]]]
    tls: ssl.SSLContext | None = None
    delay: float = 0.0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    httpd: http.server.ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def start(self) -> Server:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers.items())))
                time.sleep(server.delay)
                status, headers = server.answer(self.path)
                body = f"status {status} for {self.path}\n".encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            @override
            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Httpd(http.server.ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self.httpd = Httpd((self.address, 0), Handler)
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(answer=lambda _path: (200, {}), *, address="127.0.0.1", **kw) -> Server:
        server = Server(address, answer, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def http_check(port: int, **kw) -> HealthChecks:
    return HealthChecks(http=(HttpCheck(kw.pop("description", "front page"), port, **kw),))


# -- http checks, from the deployer --------------------------------------------------------


def test_http_200_passes_and_asks_the_default_host(serve):
    # The default host is where the request goes: a server on another loopback address.
    server = serve(address="127.0.0.5")
    outcome, lines, _ = check_all(http_check(server.port), default_host="127.0.0.5")
    assert outcome == "1 health check passed"
    assert [path for path, _ in server.requests] == ["/"]
    assert len(lines) == 1 and lines[0].startswith("health check 'front page' passed (")


def test_http_503_fails_with_the_status_and_the_answer_as_detail(serve):
    server = serve(lambda _path: (503, {}), address="127.0.0.5")
    checks = http_check(server.port, period=0.3, timeout=1)
    outcome, lines, seconds = check_all(checks, default_host="127.0.0.5")
    assert isinstance(outcome, HealthCheckError) and isinstance(outcome, WaggleError)
    assert outcome.exit_code == 1 and outcome.check == "front page"
    assert str(outcome) == (
        f"health check 'front page' failed after 1 s: http://127.0.0.5:{server.port}/ answered 503"
    )
    assert "status 503 for /" in outcome.detail
    assert len(server.requests) >= 3  # retried every 0.3 s for 1 s
    assert any("try 1 failed" in line and "next try in 0.3 s" in line for line in lines)
    assert 1 <= seconds <= 1 + LAST_TRY + SLACK


def test_http_check_retries_until_the_server_is_healthy(serve):
    ready = time.monotonic() + 0.8
    server = serve(lambda _path: (200 if time.monotonic() > ready else 503, {}))
    outcome, lines, seconds = check_all(http_check(server.port, period=0.5, timeout=5))
    assert outcome == "1 health check passed"
    assert "answered 503" in lines[0]
    assert "passed on try" in lines[-1] and seconds < 3


def test_closed_port_fails_within_the_bound():
    reserved = socket.socket()  # bound, never listening: connections are refused
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    try:
        outcome, lines, seconds = check_all(http_check(port, period=0.4, timeout=1.2))
    finally:
        reserved.close()
    assert isinstance(outcome, HealthCheckError)
    assert str(outcome) == (
        f"health check 'front page' failed after 1.2 s: http://127.0.0.1:{port}/:"
        " connection refused"
    )
    assert len(lines) >= 2  # several tries
    assert 1.2 <= seconds <= 1.2 + LAST_TRY + SLACK


def test_a_server_that_accepts_and_never_answers_fails_within_the_bound():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        outcome, _, seconds = check_all(http_check(port, period=0.5, timeout=1.5))
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert isinstance(outcome, HealthCheckError)
    assert str(outcome).startswith("health check 'front page' failed after 1.5 s: ")
    assert str(outcome).endswith(f"http://127.0.0.1:{port}/: no answer within 1.5 s")
    assert held  # the connection was accepted; the answer never came
    assert 1.5 <= seconds <= 1.5 + LAST_TRY + SLACK


def test_headers_and_path_are_sent_and_no_proxy_is_used(serve, monkeypatch):
    server = serve()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead.getsockname()[1]}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    headers = (("Host", "front.example"), ("X-Check", "waggle"))
    try:
        outcome, _, _ = check_all(
            http_check(server.port, path="/health?full=1", headers=headers, timeout=2)
        )
    finally:
        dead.close()
    assert outcome == "1 health check passed"
    (path, seen), *_ = server.requests
    assert path == "/health?full=1"
    assert seen["Host"] == "front.example" and seen["X-Check"] == "waggle"


def test_redirects_are_followed_only_on_the_same_host(serve):
    other = serve(address="127.0.0.6")
    server = serve(
        lambda path: {
            "/old": (302, {"Location": "/new"}),
            "/away": (302, {"Location": f"http://127.0.0.6:{other.port}/"}),
        }.get(path, (200, {}))
    )
    outcome, _, _ = check_all(http_check(server.port, path="/old", timeout=2))
    assert outcome == "1 health check passed"
    assert [p for p, _ in server.requests] == ["/old", "/new"]
    outcome, _, _ = check_all(http_check(server.port, path="/away", timeout=0.5))
    assert isinstance(outcome, HealthCheckError)
    assert f"answered 302 (redirect to http://127.0.0.6:{other.port}/ not followed)" in str(outcome)
    assert other.requests == []  # never asked


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_https_verifies_the_certificate_unless_insecure_ssl(serve, tmp_path):
    server = serve(tls=self_signed(tmp_path))
    outcome, _, _ = check_all(http_check(server.port, scheme="https", period=0.3, timeout=0.6))
    assert isinstance(outcome, HealthCheckError)
    assert f"https://127.0.0.1:{server.port}/: certificate not trusted" in str(outcome)
    assert server.requests == []  # no request was sent over the untrusted connection
    insecure = http_check(server.port, scheme="https", insecure_ssl=True, timeout=2)
    assert check_all(insecure)[0] == "1 health check passed"
    assert len(server.requests) == 1


def test_many_checks_run_at_once(serve):
    # 40 checks, each answered after 0.5 s: together about as long as one. (In
    # asyncio.to_thread's executor, min(32, CPUs + 4) workers, they would queue.)
    server = serve(delay=0.5)
    checks = HealthChecks(
        http=tuple(HttpCheck(f"page {i}", server.port, path=f"/{i}") for i in range(40))
    )
    outcome, _, seconds = check_all(checks)
    assert outcome == "40 health checks passed"
    assert len(server.requests) == 40
    assert seconds < 0.5 + 1.5


def test_no_checks_and_no_host():
    assert check_all(HealthChecks())[0] == "no health checks"
    outcome, _, _ = check_all(http_check(80), default_host="")
    assert isinstance(outcome, HealthCheckError)
    assert (
        str(outcome) == "health check 'front page' has no host to ask: set its host or targetHost"
    )


# -- cmd checks, on a fleet host -----------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the test fleet needs root (mount namespaces, port 22)")
    directory = tmp_path_factory.mktemp("health-fleet")
    with Fleet.start(directory, 1, names=[NODE], first_octet=free_first_octet(1, 230)) as f:
        yield f


def on_host(fleet: Fleet, checks: HealthChecks):
    """check_all with an SshHost connected to the fleet host as root."""
    target = SshTarget(node=NODE, host=NODE, user="root", escalation=("sudo", "-H", "--"))
    host = SshHost(target, SshSettings(config_files=(str(fleet.ssh_config),)))
    lines: list[str] = []

    async def main():
        try:
            return await run_health_checks(
                host, checks, default_host=fleet[NODE].address, on_line=lines.append
            )
        finally:
            await host.close()

    start = time.monotonic()
    try:
        outcome: str | HealthCheckError = asyncio.run(main())
    except HealthCheckError as e:
        outcome = e
    return outcome, lines, time.monotonic() - start


def cmd(description: str, *argv: str, **kw) -> CmdCheck:
    return CmdCheck(description, argv, **kw)


def test_cmd_checks_run_on_the_host_with_each_argument_quoted(fleet):
    marker = fleet[NODE].path("/run/only-on-the-host")
    marker.write_text("x")
    assert not Path("/run/only-on-the-host").exists()
    tricky = "a b'c $HOME;false"
    checks = HealthChecks(
        cmd=(
            cmd("true", "true"),
            cmd("marker", "test", "-e", "/run/only-on-the-host"),
            cmd("argv", "sh", "-c", 'test "$1" = "$2"', "sh", tricky, tricky),
        )
    )
    outcome, lines, _ = on_host(fleet, checks)
    assert outcome == "3 health checks passed"
    assert len([line for line in lines if "passed" in line]) == 3


def test_failing_cmd_check_names_the_check_and_its_status(fleet):
    checks = HealthChecks(
        cmd=(cmd("nginx up", "sh", "-c", "echo inactive; exit 3", period=0.3, timeout=1),)
    )
    outcome, lines, seconds = on_host(fleet, checks)
    assert isinstance(outcome, HealthCheckError) and outcome.exit_code == 1
    assert str(outcome) == "health check 'nginx up' failed after 1 s: exit status 3: inactive"
    assert outcome.detail.startswith("inactive\n") and " tries in " in outcome.detail
    assert lines[0] == (
        "health check 'nginx up': try 1 failed: exit status 3: inactive; next try in 0.3 s"
    )
    assert 1 <= seconds <= 1 + LAST_TRY + SLACK


def test_cmd_check_passes_on_the_second_try(fleet):
    ready = fleet[NODE].path("/run/ready")
    ready.unlink(missing_ok=True)
    timer = threading.Timer(1.0, ready.write_text, args=("up\n",))
    checks = HealthChecks(cmd=(cmd("ready", "cat", "/run/ready", period=1.5, timeout=5),))
    timer.start()
    try:
        outcome, lines, seconds = on_host(fleet, checks)
    finally:
        timer.cancel()
    assert outcome == "1 health check passed"
    assert lines[0].startswith("health check 'ready': try 1 failed: exit status 1: cat:")
    assert lines[-1].startswith("health check 'ready' passed on try 2 (")
    assert 1.5 <= seconds < 1.5 + 1 + SLACK


def test_a_hanging_command_is_bounded_and_fails_fast_for_all(fleet):
    # A command that never ends fails at its timeout (+ the last try), and the node's other,
    # slower check is not waited for.
    checks = HealthChecks(
        cmd=(
            cmd("hangs", "sleep", "30", period=0.5, timeout=1.5),
            cmd("slow but fine", "sleep", "20", timeout=25),
        )
    )
    outcome, _, seconds = on_host(fleet, checks)
    assert isinstance(outcome, HealthCheckError) and outcome.check == "hangs"
    assert str(outcome).startswith("health check 'hangs' failed after ")
    assert "timed out after" in str(outcome)
    assert 1.5 <= seconds <= 1.5 + LAST_TRY + SLACK


def test_cmd_and_http_checks_run_concurrently(fleet, serve):
    server = serve(address=fleet[NODE].address, delay=1.0)  # on the host's own address
    checks = HealthChecks(
        cmd=(cmd("one", "sleep", "1"), cmd("two", "sleep", "1")),
        http=(HttpCheck("front page", server.port),),  # host: the default, the host's address
    )
    outcome, _, seconds = on_host(fleet, checks)
    assert outcome == "3 health checks passed"
    assert len(server.requests) == 1
    assert seconds < 1 + 1.2  # not 3 s one after the other


# -- the model: NodeConfig.from_json ---------------------------------------------------------


def from_json(health) -> NodeConfig:
    return NodeConfig.from_json("web-1", {"targetHost": "h", "healthChecks": health})


def test_model_defaults_and_helpers():
    plain = NodeConfig.from_json("web-1", {"targetHost": "h"})
    assert plain.health_checks == HealthChecks() and not plain.health_checks
    assert plain.health_checks.empty and len(plain.health_checks) == 0
    got = from_json(
        {
            "cmd": [{"description": "up", "cmd": ["true"]}],
            "http": [{"description": "v6", "port": 80, "host": "::1"}],
        }
    ).health_checks
    assert got and not got.empty and len(got) == 2
    assert got.cmd == (CmdCheck("up", ("true",), 2, 5),)
    assert got.http[0].url("ignored") == "http://[::1]:80/"
    assert HttpCheck("x", 8080).url("127.0.0.5") == "http://127.0.0.5:8080/"
    assert [c.description for c in got] == ["up", "v6"]


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"http": [{"description": "f", "port": 80, "scheme": "ftp"}]}, "scheme must be http or"),
        ({"http": [{"description": "f", "port": 0}]}, "port must be a number from 1 to 65535"),
        ({"http": [{"description": "f", "port": 65536}]}, "port must be a number from 1"),
        ({"http": [{"description": "f", "port": True}]}, "port must be"),
        ({"http": [{"description": "f"}]}, "port must be"),
        ({"http": [{"description": "f", "port": 80, "period": 0}]}, "period must be more than 0"),
        ({"http": [{"description": "f", "port": 80, "timeout": -1}]}, "timeout must be more"),
        ({"http": [{"description": "f", "port": 80, "timeout": "5"}]}, "timeout must be a number"),
        ({"http": [{"description": "f", "port": 80, "path": "x"}]}, "path 'x' must start with /"),
        ({"http": [{"description": "f", "port": 80, "path": "/a b"}]}, "no spaces"),
        ({"http": [{"description": "f", "port": 80, "host": "a/b"}]}, "not a host name"),
        ({"http": [{"description": "f", "port": 80, "host": "h:80"}]}, "not a host name"),
        ({"http": [{"description": "f", "port": 80, "headers": {"A B": "x"}}]}, "header name"),
        ({"http": [{"description": "f", "port": 80, "headers": {"A": "x\ny"}}]}, "one line"),
        ({"http": [{"description": "f", "port": 80, "url": "/"}]}, "unknown option url"),
        ({"http": [{"port": 80}]}, "description must be a non-empty string"),
        ({"cmd": [{"description": "c", "cmd": []}]}, "cmd must be a non-empty list of strings"),
        ({"cmd": [{"description": "c", "cmd": "true"}]}, "cmd must be a non-empty list"),
        ({"cmd": [{"description": "c", "cmd": ["true"], "period": 0}]}, "period must be more"),
        ({"cmd": [{"description": "c", "cmd": ["true"], "timeout": 0}]}, "timeout must be more"),
        ({"cmd": [{"description": "c"}]}, "cmd must be a non-empty list"),
        ({"cmd": {"description": "c"}}, "cmd must be a list of attribute sets"),
        ({"tcp": []}, "unknown option tcp"),
    ],
)
def test_model_bad_values_name_node_and_option(health, message):
    with pytest.raises(HiveError, match=message) as e:
        from_json(health)
    text = str(e.value)
    assert text.startswith("node web-1: deployment.healthChecks") and "\n" not in text
    assert "[0]" in text or "tcp" in text or "must be a list" in text


# -- the options, through a real hive --------------------------------------------------------

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = {
    deployment.healthChecks.cmd = [ { description = "system up"; cmd = [ "systemctl" "is-system-running" ]; } ];
  };
  plain = { lib, ... }: { deployment.healthChecks.cmd = lib.mkForce [ ]; };
  web = {
    deployment.targetHost = "10.0.0.7";
    deployment.healthChecks = {
      cmd = [
        { description = "nginx up"; cmd = [ "systemctl" "is-active" "nginx" ]; }
        { description = "fast"; cmd = [ "true" ]; period = 1; timeout = 2.5; }
      ];
      http = [
        { scheme = "http"; port = 80; path = "/"; host = null; description = "front page"; }
        {
          description = "api";
          scheme = "https";
          host = "api.example";
          port = 8443;
          path = "/health?x=1";
          headers = { Host = "api.internal"; X-Token = "t"; };
          period = 0.5;
          timeout = 10;
          insecureSSL = true;
        }
      ];
    };
  };
}
"""


def deployment_of(directory: Path, text: str) -> dict[str, NodeConfig]:
    hive = Hive(locate(str(write_hive(directory, text)), directory), NixFlags())

    async def main():
        return await hive.deployment(await hive.node_names())

    return asyncio.run(main())


def test_options_defaults_and_morph_values_round_trip(tmp_path):
    configs = deployment_of(tmp_path, HIVE)
    assert configs["plain"].health_checks == HealthChecks()
    web = configs["web"].health_checks
    # Lists from `defaults` and the node merge (the module system decides the order).
    node_own = [
        CmdCheck("nginx up", ("systemctl", "is-active", "nginx"), 2, 5),
        CmdCheck("fast", ("true",), 1, 2.5),
    ]
    assert [c for c in web.cmd if c in node_own] == node_own
    assert set(web.cmd) == {*node_own, CmdCheck("system up", ("systemctl", "is-system-running"))}
    assert web.http == (
        HttpCheck("front page", 80),
        HttpCheck(
            "api",
            8443,
            scheme="https",
            host="api.example",
            path="/health?x=1",
            headers=(("Host", "api.internal"), ("X-Token", "t")),
            period=0.5,
            timeout=10,
            insecure_ssl=True,
        ),
    )
    assert web.http[0].url(configs["web"].target_host or "") == "http://10.0.0.7:80/"
    # `nodes --json` shows them (header values left out: they may hold a token)
    listed = json.loads(waggle("nodes", "--json", "--on", "web", cwd=tmp_path).stdout)[0]
    http = listed["healthChecks"]["http"]
    assert [h["description"] for h in http] == ["front page", "api"]
    assert http[1]["headers"] == ["Host", "X-Token"] and http[1]["insecureSSL"] is True
    assert {c["description"] for c in listed["healthChecks"]["cmd"]} == {
        "nginx up", "fast", "system up"}  # fmt: skip


def test_a_node_without_health_checks_has_the_empty_default(tmp_path):
    configs = deployment_of(tmp_path, "{ meta.nixpkgs = import @NIXPKGS@ { }; alpha = { }; }")
    assert configs["alpha"].health_checks == HealthChecks()
    got = waggle(
        "eval", "-E", "{ nodes, ... }: nodes.alpha.config.deployment.healthChecks", cwd=tmp_path
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"cmd": [], "http": []}


@pytest.mark.parametrize(
    ("check", "needles"),
    [
        # Refused by the option types (Nix's message, first line naming node and option).
        ('http = [ { description = "f"; port = 80; scheme = "ftp"; } ]', ["scheme"]),
        ('http = [ { description = "f"; port = 0; } ]', ["port"]),
        ('http = [ { description = "f"; } ]', ["port"]),
        ('http = [ { description = "f"; port = 80; period = 0; } ]', ["period"]),
        ('cmd = [ { description = "c"; cmd = [ "true" ]; timeout = -1; } ]', ["timeout"]),
        ('cmd = [ { description = "c"; cmd = [ ]; } ]', ["cmd"]),
        ('cmd = [ { description = "c"; cmd = [ "true" ]; url = "x"; } ]', ["url"]),
        # Refused by Waggle's model (types.str cannot say it).
        (
            'http = [ { description = "f"; port = 80; path = "health"; } ]',
            ["deployment.healthChecks.http[0] ('f'): path 'health' must start with /"],
        ),
        (
            'http = [ { description = "f"; port = 80; headers.X = "a\\nb"; } ]',
            ["deployment.healthChecks.http[0] ('f'): headers.X must be one line"],
        ),
        (
            'http = [ { description = "f"; port = 80; host = "h/x"; } ]',
            ["host 'h/x' is not a host name or address"],
        ),
    ],
)
def test_options_bad_values_give_one_line_errors(tmp_path, check, needles):
    write_hive(
        tmp_path,
        f"{{ meta.nixpkgs = import @NIXPKGS@ {{ }}; alpha = {{ deployment.healthChecks.{check}; }}; }}",
    )
    done = waggle("nodes", "--json", cwd=tmp_path)
    assert_clean_error(done, 2, *needles)
    first = next(line for line in done.stderr.splitlines() if line.startswith("waggle: error:"))
    assert first.startswith("waggle: error: node alpha: ")
    assert "healthChecks" in first
    for needle in needles:
        assert needle in first, (needle, first)
