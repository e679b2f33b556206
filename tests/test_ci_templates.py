"""The CI templates in ci-templates/: valid YAML, the promised structure, and `waggle` command
lines that the real CLI parser accepts."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from runner.cli import build_parser

TEMPLATES = Path(__file__).resolve().parent.parent / "ci-templates"
GITHUB_WORKFLOW = TEMPLATES / "github" / "waggle.yml"
GITHUB_ACTION = TEMPLATES / "github" / "action.yml"
GITLAB = TEMPLATES / "gitlab" / ".gitlab-ci.yml"
DRONE = TEMPLATES / "drone" / ".drone.yml"


def yaml_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.rglob("*") if p.suffix in (".yml", ".yaml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_template_is_yaml():
    files = yaml_files()
    assert {GITHUB_WORKFLOW, GITHUB_ACTION, GITLAB, DRONE} <= set(files)
    for path in files:
        assert load_all(path), path


def test_host_key_checking_never_disabled():
    for path in [*yaml_files(), TEMPLATES / "README.md"]:
        text = path.read_text()
        squashed = re.sub(r"\s+", "", text).lower()
        assert "stricthostkeychecking=no" not in squashed, path
        assert "stricthostkeycheckingno" not in squashed, path
        assert "userknownhostsfile=/dev/null" not in squashed, path
        assert "--no-host-key-check" not in text, path


# -- GitHub ------------------------------------------------------------------------------


def test_github_workflow_structure():
    workflow = load(GITHUB_WORKFLOW)
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads `on:` as true
    assert "pull_request" in on
    assert "main" in on["push"]["branches"]
    jobs = workflow["jobs"]
    deploy = jobs["deploy"]
    assert deploy["concurrency"]["cancel-in-progress"] is False
    assert deploy["concurrency"]["group"]
    assert deploy["environment"]
    # the deploy job runs only for pushes to main: never for a pull request from a fork
    assert "github.event_name == 'push'" in deploy["if"]
    assert "refs/heads/main" in deploy["if"]
    for job in jobs.values():
        checkouts = [
            s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout")
        ]
        assert checkouts
        assert all(s["with"]["fetch-depth"] == 0 for s in checkouts)
    # JUnit shown by a test-report action, whatever the run's outcome
    reporters = [s for s in deploy["steps"] if "test-reporter" in str(s.get("uses", ""))]
    assert reporters
    assert reporters[0]["with"]["reporter"] == "java-junit"
    assert "always()" in reporters[0]["if"]


def test_github_secrets_only_in_the_deploy_job():
    workflow = load(GITHUB_WORKFLOW)
    plan = workflow["jobs"]["plan"]
    assert plan["if"] == "github.event_name == 'pull_request'"
    assert "secrets." not in yaml.safe_dump(plan)
    deploy_text = yaml.safe_dump(workflow["jobs"]["deploy"])
    assert "secrets.WAGGLE_SSH_KEY" in deploy_text
    assert "secrets.WAGGLE_KNOWN_HOSTS" in deploy_text
    assert workflow["permissions"] == {"contents": "read"}


def test_github_composite_action():
    action = load(GITHUB_ACTION)
    assert action["runs"]["using"] == "composite"
    inputs = action["inputs"]
    assert inputs["ssh-private-key"]["default"] == ""
    assert {"affected-nodes", "deployed", "failed"} <= set(action["outputs"])
    steps = action["runs"]["steps"]
    assert all("shell" in s for s in steps if "run" in s)
    ssh = next(s for s in steps if "ssh-private-key" in str(s.get("if", "")))
    assert "known_hosts" in ssh["run"]
    assert any(s.get("id") == "waggle" for s in steps)


# -- GitLab ------------------------------------------------------------------------------


def test_gitlab_structure():
    config = load(GITLAB)
    assert config["variables"]["GIT_DEPTH"] == "0"
    plan, deploy = config["waggle:plan"], config["waggle:deploy"]
    assert any('$CI_PIPELINE_SOURCE == "merge_request_event"' in r["if"] for r in plan["rules"])
    assert any("$CI_DEFAULT_BRANCH" in r["if"] for r in deploy["rules"])
    assert not any(
        "merge_request_event" in r["if"] and r.get("when") != "never" for r in deploy["rules"]
    )
    assert deploy["resource_group"]
    assert deploy["environment"]["name"] == "production"
    assert deploy["interruptible"] is False
    artifacts = config[".waggle"]["artifacts"]
    assert artifacts["reports"]["junit"] == "waggle-junit.xml"
    assert artifacts["when"] == "always"
    assert all(config[job]["extends"] == ".waggle" for job in ("waggle:plan", "waggle:deploy"))
    # the SSH key only in the deploy job
    assert "WAGGLE_SSH_KEY" not in yaml.safe_dump(plan)
    assert "WAGGLE_SSH_KEY" in yaml.safe_dump(deploy)


# -- Drone -------------------------------------------------------------------------------


def test_drone_structure():
    pipelines = load_all(DRONE)
    assert all(p["kind"] == "pipeline" for p in pipelines)
    by_name = {p["name"]: p for p in pipelines}
    plan, deploy = by_name["waggle-plan"], by_name["waggle-deploy"]
    assert "pull_request" in plan["trigger"]["event"]
    assert "push" in deploy["trigger"]["event"]
    assert "pull_request" not in deploy["trigger"]["event"]
    assert deploy["trigger"]["branch"] == ["main"]
    assert deploy["concurrency"]["limit"] == 1
    assert "from_secret" not in yaml.safe_dump(plan)
    assert "from_secret" in yaml.safe_dump(deploy)


# -- waggle command lines ------------------------------------------------------------------


def command_lines() -> list[tuple[Path, str]]:
    """Every shell line in the templates that runs `waggle`."""
    found = []
    for path in yaml_files():
        for line in path.read_text().splitlines():
            text = re.sub(r"^\s*(-\s+)?(run:\s*)?", "", line).strip()
            if text.startswith("waggle ") and not text.startswith("waggle:"):
                found.append((path, text))
    return found


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def split(path: Path, line: str) -> list[str]:
    argv = shlex.split(line, comments=True)
    assert argv[0] == "waggle", (path, line)
    return argv[1:]


def test_there_are_waggle_command_lines():
    lines = command_lines()
    files = {p for p, _ in lines}
    assert {GITHUB_WORKFLOW, GITHUB_ACTION, GITLAB, DRONE} <= files


def test_command_lines_parse_with_existing_subcommands():
    """Lines whose subcommand the CLI already has must parse; the rest are checked by the
    xfail test below until the subcommand exists."""
    parser = build_parser()
    known = subcommands(parser)
    for path, line in command_lines():
        argv = split(path, line)
        if argv and argv[0] in known:
            parser.parse_args(argv)


CI_FLAG_SHAPES = {
    "--junit": True,  # takes a value
    "--report-md": True,
    "--report-json": True,
    "--on": True,
    "--ci-config": True,
    "--comment": False,
    "--no-comment": False,
}


def test_pending_subcommand_lines_have_known_flag_shapes():
    """For `ci`/`plan` lines: only flags whose shape we know, each value present."""
    known = subcommands(build_parser())
    for path, line in command_lines():
        argv = split(path, line)
        if argv[0] in known:
            continue
        assert argv[0] in ("ci", "plan"), (path, line)
        rest = argv[1:]
        i = 0
        while i < len(rest):
            flag = rest[i]
            assert flag in CI_FLAG_SHAPES, (path, line, flag)
            if CI_FLAG_SHAPES[flag]:
                assert i + 1 < len(rest) and not rest[i + 1].startswith("-"), (path, line)
                i += 1
            i += 1


def test_pending_subcommand_lines_parse():
    parser = build_parser()
    known = subcommands(parser)
    pending = [(p, line) for p, line in command_lines() if split(p, line)[0] not in known]
    # Every subcommand the templates use exists (waggle ci, waggle plan, ...).
    assert pending == []


# -- installing Waggle: the project's own distribution, pinned -------------------------------

DISTRIBUTION = "waggle-deploy"  # "waggle" on the package index is an unrelated project
PINNED = re.compile(
    rf"^{DISTRIBUTION}==\d+(\.\d+)*$"  # an exact release
    rf"|^(({DISTRIBUTION}|waggle) @ )?git\+https://\S+@[0-9a-f]{{40}}(#egg={DISTRIBUTION})?$"
)
_VALUE_FLAGS = {"-r", "--requirement", "-c", "--constraint", "-t", "--target", "-i", "--index-url"}


def template_files() -> list[Path]:
    return [*yaml_files(), TEMPLATES / "README.md"]


def scalars_by_key(data: Any, out: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Every string value in a YAML document under its key, at any depth (env, variables,
    environment, inputs' defaults)."""
    out = {} if out is None else out
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                out.setdefault(str(key), []).append(str(value))
            else:
                scalars_by_key(value, out)
    elif isinstance(data, list):
        for item in data:
            scalars_by_key(item, out)
    return out


def resolve_spec(spec: str, path: Path, depth: int = 0) -> list[str]:
    """What a pip argument stands for: `$VAR`, `${VAR}` and `${{ inputs.NAME }}` are looked
    up in the file (every value it may take); anything else is itself."""
    var = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", spec)
    expr = re.fullmatch(r"\$\{\{\s*inputs\.([A-Za-z0-9_-]+)\s*\}\}", spec)
    if not (var or expr) or depth > 5:
        return [spec]
    docs = load_all(path) if path.suffix in (".yml", ".yaml") else []
    values: list[str] = []
    for doc in docs:
        if expr:
            inputs = doc.get("inputs", {}) if isinstance(doc, dict) else {}
            values += (
                [str(inputs[expr.group(1)].get("default", ""))] if expr.group(1) in inputs else []
            )
        else:
            values += scalars_by_key(doc).get(var.group(1), []) if var else []
    assert values, (path, f"{spec} is set nowhere in the template")
    return [v for value in values for v in resolve_spec(value.strip(), path, depth + 1)]


def pip_installs(path: Path) -> list[tuple[str, list[str]]]:
    """(line, the packages it installs, variables resolved) for each `pip install` line."""
    found = []
    for line in path.read_text().splitlines():
        match = re.search(r"\bpip3?\s+install\s+(.*)$", line)
        if match is None:
            continue
        command = re.split(r"\s*(?:&&|\|\||;|\|)\s*", match.group(1))[0]
        argv = shlex.split(command, comments=True)
        specs: list[str] = []
        skip = False
        for arg in argv:
            if skip:
                skip = False
            elif arg in _VALUE_FLAGS:
                skip = True
            elif not arg.startswith("-"):
                specs += resolve_spec(arg, path)
        found.append((line.strip(), specs))
    return found


def test_templates_install_the_pinned_waggle_distribution():
    for path in yaml_files():
        installs = pip_installs(path)
        assert installs, (path, "installs nothing")
    for path in template_files():
        for line, specs in pip_installs(path):
            assert specs, (path, line)
            for spec in specs:
                assert PINNED.match(spec), (
                    f"{path.relative_to(TEMPLATES)}: `{line}` installs {spec!r}: a bare or "
                    f"unpinned name; use {DISTRIBUTION}==VERSION or git+https://...@COMMIT"
                )


def test_the_distribution_is_not_named_waggle():
    import tomllib

    project = tomllib.loads((TEMPLATES.parent / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    assert project["scripts"] == {"waggle": "runner.cli:main"}  # the command stays `waggle`
    version = project["version"]
    for path in yaml_files():
        pins = {s for _, specs in pip_installs(path) for s in specs if "==" in s}
        assert pins <= {f"{DISTRIBUTION}=={version}"}, (path, pins, version)


# -- shard templates: a matrix of `waggle ci` jobs and a merge job ---------------------------

GITHUB_SHARDS = TEMPLATES / "github" / "waggle-shards.yml"
GITLAB_SHARDS = TEMPLATES / "gitlab" / ".gitlab-ci-shards.yml"
DRONE_SHARDS = TEMPLATES / "drone" / ".drone-shards.yml"


def assert_complete_shards(values: list[str]) -> None:
    """Every value is a valid K/N (as `waggle ci` parses WAGGLE_SHARD), and together they
    are shards 1..N of one N, each once."""
    from runner.shard import parse_shard

    specs = [parse_shard(v, "WAGGLE_SHARD") for v in values]
    total = specs[0].total
    assert sorted(s.index for s in specs) == list(range(1, total + 1)), values
    assert {s.total for s in specs} == {total}


def merge_line(path: Path) -> list[str]:
    argv = [split(p, line) for p, line in command_lines() if p == path]
    merges = [a for a in argv if a[:2] == ["report", "merge"]]
    assert len(merges) == 1, (path, argv)
    build_parser().parse_args(merges[0])
    return merges[0]


def test_shard_templates_exist_and_merge():
    for path in (GITHUB_SHARDS, GITLAB_SHARDS, DRONE_SHARDS):
        assert path in yaml_files()
        argv = merge_line(path)
        assert "--junit" in argv and "--report-md" in argv


def test_github_shards_matrix_and_merge_job():
    jobs = load(GITHUB_SHARDS)["jobs"]
    deploy, report = jobs["deploy"], jobs["report"]
    strategy = deploy["strategy"]
    assert strategy["fail-fast"] is False  # one failing shard never cancels another's switch
    assert_complete_shards(strategy["matrix"]["shard"])
    step = next(s for s in deploy["steps"] if "waggle ci" in str(s.get("run", "")))
    assert step["env"]["WAGGLE_SHARD"] == "${{ matrix.shard }}"
    assert "--report-json" in step["run"]
    assert deploy["concurrency"]["cancel-in-progress"] is False
    assert "strategy.job-index" in deploy["concurrency"]["group"]
    uploads = [s for s in deploy["steps"] if "upload-artifact" in str(s.get("uses", ""))]
    assert "job-index" in uploads[0]["with"]["name"] and "always()" in uploads[0]["if"]
    assert report["needs"] == "deploy" and "always()" in report["if"]
    assert "secrets." not in yaml.safe_dump(report)  # merging needs no credentials


def test_gitlab_shards_parallel_and_merge_job():
    config = load(GITLAB_SHARDS)
    deploy, report = config["waggle:deploy"], config["waggle:report"]
    assert deploy["parallel"] >= 2 and deploy["interruptible"] is False
    assert "$CI_NODE_INDEX" in deploy["resource_group"]
    assert "$CI_NODE_INDEX" in deploy["script"][-1]  # one report file per shard
    assert deploy["artifacts"]["when"] == "always"
    assert report["needs"] == [{"job": "waggle:deploy", "artifacts": True}]
    assert all(r.get("when") == "always" for r in report["rules"])
    assert report["artifacts"]["reports"]["junit"] == "waggle-junit.xml"
    assert "WAGGLE_SSH_KEY" not in yaml.safe_dump(report)


def test_drone_shards_parallel_steps_and_merge_step():
    (pipeline,) = load_all(DRONE_SHARDS)
    assert pipeline["concurrency"]["limit"] == 1
    assert "pull_request" not in pipeline["trigger"]["event"]
    steps = {s["name"]: s for s in pipeline["steps"]}
    shards = [s for s in pipeline["steps"] if "WAGGLE_SHARD" in s.get("environment", {})]
    assert_complete_shards([s["environment"]["WAGGLE_SHARD"] for s in shards])
    assert len({tuple(s["depends_on"]) for s in shards}) == 1  # all at once
    for step in shards:
        assert any("waggle ci --report-json" in c for c in step["commands"])
    report = steps["report"]
    assert sorted(report["depends_on"]) == sorted(s["name"] for s in shards)
    assert "failure" in report["when"]["status"]
    assert "from_secret" not in yaml.safe_dump(report)
