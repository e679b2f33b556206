"""`waggle plan` through the CLI, on a real git repository."""

from __future__ import annotations

import json
import subprocess

import pytest
from typing_extensions import override

from tests.conftest import write_hive
from tests.helpers import assert_clean_error, outside_ci, waggle

HIVE = """
{
  meta.nixpkgs = import @NIXPKGS@ { };
  defaults = { name, ... }: { networking.hostName = name; };
  alpha = import ./alpha.nix;
  beta = { environment.etc.beta.text = "beta"; };
}
"""


def git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_plan_names_the_changed_node(tmp_path):
    write_hive(tmp_path, HIVE)
    (tmp_path / "alpha.nix").write_text(
        "{ pkgs, ... }: { environment.systemPackages = [ pkgs.hello ]; }\n"
    )
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    (tmp_path / "alpha.nix").write_text(
        "{ pkgs, ... }: { environment.systemPackages = [ pkgs.hello pkgs.jq ]; }\n"
    )
    (tmp_path / "README.md").write_text("docs only\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "second")
    done = waggle(
        "plan",
        "--base",
        "HEAD~1",
        "--json",
        str(tmp_path / "plan.json"),
        "--junit",
        str(tmp_path / "plan.xml"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    kinds = {n["name"]: n["kind"] for n in plan["nodes"]}
    assert kinds == {"alpha": "changed", "beta": "unchanged"}
    assert "jq" in (tmp_path / "plan.json").read_text()
    assert (tmp_path / "plan.xml").read_text().startswith("<?xml")
    # A base that stays unknown: every node is affected, and the plan says why.
    unknown = waggle("plan", "--base", "no-such-rev", "--no-build", cwd=tmp_path)
    assert unknown.returncode == 0, unknown.stderr
    assert "no-such-rev is not in the repository" in unknown.stdout
    assert "Traceback" not in unknown.stderr


LEAKY_ALPHA = (
    '{ ... }: throw "token=${builtins.getEnv "GITHUB_TOKEN"} '
    'git=${builtins.getEnv "WAGGLE_GIT_TOKEN"} mine=${builtins.getEnv "FORGE_TOKEN"}"\n'
)


@pytest.mark.parametrize("leaky", [False, True], ids=["plain", "hive-reads-tokens"])
def test_ci_posts_the_plan_as_a_sticky_comment(tmp_path, leaky):
    """waggle ci on a pull request with comment: true talks to the forge API (a local server).
    The PR's hive is evaluated without the tokens in its environment: one that reads them
    with builtins.getEnv and throws them gets empty strings, so they reach no comment."""
    import http.server
    import threading

    requests: list[tuple[str, str, str, bytes]] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            requests.append(("GET", self.path, self.headers.get("Authorization", ""), b""))
            self._reply(200, b"[]")

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append(("POST", self.path, self.headers.get("Authorization", ""), body))
            self._reply(201, b'{"id": 1}')

        @override
        def log_message(self, *args):  # keep the test output clean
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        write_hive(tmp_path, HIVE)
        (tmp_path / "alpha.nix").write_text("{ }\n")
        # On a pull request the settings count from the base commit.
        (tmp_path / "waggle.yaml").write_text(
            "comment: true\n" + ("token_env: FORGE_TOKEN\n" if leaky else "")
        )
        git(tmp_path, "init", "-q", "-b", "main")
        git(tmp_path, "add", "-A")
        git(tmp_path, "commit", "-qm", "first")
        base = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()
        (tmp_path / "alpha.nix").write_text(
            LEAKY_ALPHA if leaky else '{ environment.etc.x.text = "changed"; }\n'
        )
        git(tmp_path, "commit", "-qam", "second")
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()
        event = tmp_path / "event.json"
        event.write_text(
            json.dumps(
                {
                    "pull_request": {
                        "number": 5,
                        "base": {"sha": base, "repo": {"full_name": "acme/fleet"}},
                        "head": {"sha": head, "repo": {"full_name": "acme/fleet"}},
                    },
                    "repository": {"full_name": "acme/fleet", "default_branch": "main"},
                }
            )
        )
        env = outside_ci(
            CI="true",
            GITHUB_ACTIONS="true",
            GITHUB_EVENT_NAME="pull_request",
            GITHUB_EVENT_PATH=str(event),
            GITHUB_SHA=head,
            GITHUB_REF_NAME="5/merge",
            GITHUB_REPOSITORY="acme/fleet",
            GITHUB_TOKEN="secret-token-123",
            WAGGLE_GIT_TOKEN="secret-git-456",
            FORGE_TOKEN="secret-forge-789",
            GITHUB_API_URL=f"http://127.0.0.1:{server.server_address[1]}",
        )
        done = waggle("ci", "--report-json", "plan.json", cwd=tmp_path, env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == (1 if leaky else 0), done.stdout + done.stderr
    posts = [r for r in requests if r[0] == "POST"]
    assert [p[1] for p in posts] == ["/repos/acme/fleet/issues/5/comments"]
    token = "secret-forge-789" if leaky else "secret-token-123"
    assert posts[0][2] == f"Bearer {token}"
    body = json.loads(posts[0][3])["body"]
    assert "<!-- waggle-plan -->" in body and "alpha" in body
    if leaky:
        assert "token= git= mine=" in body, body  # the hive ran, and saw no token
    # --report-json in plan mode: the plan's JSON (it was silently not written)
    plan_file = (tmp_path / "plan.json").read_text()
    assert [n["name"] for n in json.loads(plan_file)["nodes"]][:1] == ["alpha"], plan_file
    for secret in ("secret-token-123", "secret-git-456", "secret-forge-789"):
        assert secret not in body + done.stdout + done.stderr + plan_file, secret


# -- -f outside the repository: one line, naming the file and the repository ---------------


def outside_layout(tmp_path):
    """A repository `repo` (one commit, its own hive) and a hive `other/hive.nix` outside it."""
    repo, other = tmp_path / "repo", tmp_path / "other"
    repo.mkdir()
    other.mkdir()
    write_hive(repo, HIVE)
    (repo / "alpha.nix").write_text("{ }\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    write_hive(other, HIVE)
    return repo, other / "hive.nix"


def test_watch_with_a_hive_outside_the_repo_is_one_line(tmp_path):
    repo, outside = outside_layout(tmp_path)
    relative = waggle("watch", "--once", "--repo", "repo", "-f", "other/hive.nix", cwd=tmp_path)
    assert_clean_error(relative, 2, str(outside), str(repo))
    absolute = waggle("watch", "--once", "--repo", str(repo), "-f", str(outside), cwd=tmp_path)
    assert_clean_error(absolute, 2, str(outside), str(repo))
    flake_ref = waggle("watch", "--once", "--repo", str(repo), "-f", "github:a/b", cwd=tmp_path)
    assert_clean_error(flake_ref, 2, "github:a/b", str(repo))


def test_plan_with_a_hive_outside_the_repo_is_one_line(tmp_path):
    repo, outside = outside_layout(tmp_path)
    done = waggle("plan", "--base", "HEAD", "-f", str(outside), cwd=repo)
    assert_clean_error(done, 2, str(outside), str(repo))
    # A hive that is a symlink out of the repository: its file is not in the commits.
    (repo / "linked.nix").symlink_to(outside)
    done = waggle("plan", "--base", "HEAD", "-f", "linked.nix", cwd=repo)
    assert_clean_error(done, 2, str(outside), str(repo))
    (repo / "sub").mkdir()
    (repo / "sub" / "hive.nix").symlink_to(outside)
    done = waggle("plan", "--base", "HEAD", cwd=repo / "sub")
    assert_clean_error(done, 2, str(repo / "sub" / "hive.nix"), str(outside), str(repo))


# -- waggle ci: a report on stdout ('-') replaces the usual output --------------------------


def _two_commits(tmp_path) -> tuple[str, str]:
    write_hive(tmp_path, HIVE)
    (tmp_path / "alpha.nix").write_text("{ }\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    (tmp_path / "alpha.nix").write_text('{ environment.etc.x.text = "changed"; }\n')
    git(tmp_path, "commit", "-qam", "second")
    revs = subprocess.run(
        ["git", "rev-list", "-2", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    return revs[1], revs[0]


@pytest.mark.parametrize("flag", ["--report-json", "--junit", "--report-md"])
def test_ci_sends_the_report_asked_for_with_a_dash_to_stdout(tmp_path, flag):
    """Outside a CI service `waggle ci` builds; `-` put nothing on stdout before."""
    _two_commits(tmp_path)
    done = waggle("ci", "--on", "alpha", flag, "-", cwd=tmp_path, env=outside_ci())
    assert done.returncode == 0, done.stdout + done.stderr
    if flag == "--report-json":
        report = json.loads(done.stdout)
        assert report["run"]["goal"] == "build"
        assert [n["name"] for n in report["nodes"]] == ["alpha"]
    elif flag == "--junit":
        assert done.stdout.startswith("<?xml") and 'name="alpha"' in done.stdout
    else:
        assert "alpha" in done.stdout and done.stdout.lstrip().startswith("#")
    assert not (tmp_path / "-").exists()


def test_ci_sends_the_plan_asked_for_with_a_dash_to_stdout(tmp_path):
    base, head = _two_commits(tmp_path)
    event = tmp_path / "event.json"
    pr = {"number": 5, "base": {"sha": base, "repo": {"full_name": "acme/fleet"}},
          "head": {"sha": head, "repo": {"full_name": "acme/fleet"}}}  # fmt: skip
    event.write_text(json.dumps({"pull_request": pr, "repository": {"full_name": "acme/fleet"}}))
    env = outside_ci(CI="true", GITHUB_ACTIONS="true", GITHUB_EVENT_NAME="pull_request",
                  GITHUB_EVENT_PATH=str(event), GITHUB_SHA=head, GITHUB_REF_NAME="5/merge",
                  GITHUB_REPOSITORY="acme/fleet")  # fmt: skip
    done = waggle("ci", "--report-json", "-", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert {n["name"]: n["kind"] for n in plan["nodes"]} == {
        "alpha": "changed",
        "beta": "unchanged",
    }
