"""waggle.yaml loading, validation and flag overrides (runner.gitops.config)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.errors import EXIT_USAGE, UsageError
from runner.gitops.config import (
    CONFIG_NAME,
    CacheConfig,
    CiConfig,
    ConfigError,
    RolloutConfig,
    load_config,
    merge,
    parse_config,
)

FULL = """\
hive: ./fleet/hive.nix
on: "@web,db-*"
deploy_branches: [main, "release/*"]
deploy_drifted: false
ignore: ["docs/**", "*.md"]
cache_dir: .cache/waggle
dry_activate_on_pr: true
comment: true
comment_forks: false
token_env: FLEET_TOKEN
junit: out/junit.xml
report_md: /tmp/report.md
outputs_dotenv: waggle.env
parallel: 4
eval_node_limit: auto
"""


def test_full_file(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(FULL)
    config = load_config(path, search_from=tmp_path)
    assert config == CiConfig(
        hive=str(tmp_path / "fleet/hive.nix"),
        on="@web,db-*",
        deploy_branches=("main", "release/*"),
        deploy_drifted=False,
        ignore=("docs/**", "*.md"),
        cache_dir=tmp_path / ".cache/waggle",
        dry_activate_on_pr=True,
        comment=True,
        comment_forks=False,
        token_env="FLEET_TOKEN",
        junit=tmp_path / "out/junit.xml",
        report_md=Path("/tmp/report.md"),
        outputs_dotenv=tmp_path / "waggle.env",
        parallel=4,
        eval_node_limit="auto",
        source=path,
    )


def test_flake_reference_hive_stays_as_written(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("hive: 'github:acme/fleet#colmenaHive'\neval_node_limit: 8\n")
    config = load_config(path, search_from=tmp_path)
    assert config.hive == "github:acme/fleet#colmenaHive"
    assert config.eval_node_limit == "8"


def test_search_upward_stops_at_repository_root(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    assert load_config(None, search_from=sub) == CiConfig()  # none found: defaults
    (tmp_path / CONFIG_NAME).write_text("comment: true\n")  # above the repository: ignored
    assert load_config(None, search_from=sub) == CiConfig()
    (repo / CONFIG_NAME).write_text("comment: true\n")
    config = load_config(None, search_from=sub)
    assert config.comment is True
    assert config.source == repo / CONFIG_NAME


def test_search_in_a_commits_tree_stops_at_the_tree_and_names_the_file_in_it(tmp_path):
    tree = tmp_path / "checkout"  # a commit's tree as waggle watch writes it: no .git
    sub = tree / "fleet"
    sub.mkdir(parents=True)
    (tmp_path / CONFIG_NAME).write_text("comment: true\n")  # above the tree: ignored
    assert load_config(None, search_from=sub, tree=tree) == CiConfig()
    (sub / CONFIG_NAME).write_text("rollout:\n  max_failures: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(None, search_from=sub, tree=tree, at="in commit 1a2b3c")
    assert e.value.message.startswith(
        "fleet/waggle.yaml in commit 1a2b3c: setting 'rollout.max_failures'"
    )


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("# nothing yet\n")
    assert load_config(path, search_from=tmp_path) == CiConfig(source=path)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="no such settings file"):
        load_config(tmp_path / "other.yaml", search_from=tmp_path)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("comment: true\ndeploy_branch: main\n")
    with pytest.raises(UsageError) as info:
        load_config(path, search_from=tmp_path)
    assert "'deploy_branch'" in str(info.value)
    assert str(path) in str(info.value)
    assert "deploy_branches" in str(info.value)  # the known keys are listed
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("comment: 'yes please'\n", "comment"),
        ("parallel: -1\n", "parallel"),
        ("parallel: true\n", "parallel"),
        ("parallel: '4'\n", "parallel"),
        ("deploy_branches: [main, 3]\n", "deploy_branches"),
        ("deploy_branches: {main: 1}\n", "deploy_branches"),
        ("ignore: 5\n", "ignore"),
        ("junit: 5\n", "junit"),
        ("hive: ''\n", "hive"),
        ("eval_node_limit: lots\n", "eval_node_limit"),
        ("dry_activate_on_pr: 1\n", "dry_activate_on_pr"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = tmp_path / CONFIG_NAME
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, search_from=tmp_path)
    assert f"setting {key!r}" in str(info.value)
    assert str(path) in str(info.value)


def test_bare_on_key_is_read_as_on(tmp_path):
    # YAML 1.1 reads `on:` as true, as in GitHub workflow files
    path = tmp_path / CONFIG_NAME
    path.write_text("on: '@web'\nignore: README.md\n")
    config = load_config(path, search_from=tmp_path)
    assert config.on == "@web"
    assert config.ignore == ("README.md",)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "a: [\n"])
def test_not_a_mapping_or_not_yaml(tmp_path, text):
    path = tmp_path / CONFIG_NAME
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, search_from=tmp_path)


def test_merge_flags_win(tmp_path):
    base = CiConfig(on="@web", parallel=4, comment=True, deploy_branches=("main",))
    merged = merge(
        base,
        {
            "on": "db-*",
            "parallel": None,  # not given: the file's value stays
            "comment": False,
            "deploy-branches": ["prod"],
            "junit": "out.xml",
        },
    )
    assert merged == CiConfig(
        on="db-*",
        parallel=4,
        comment=False,
        deploy_branches=("prod",),
        junit=Path("out.xml"),  # relative to the working directory
    )


def test_merge_checks_values_and_keys():
    with pytest.raises(ConfigError, match="'parallel'"):
        merge(CiConfig(), {"parallel": "many"})
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        merge(CiConfig(), {"bogus": 1})


# --- rollout: waves, failure budget, confirmation, health checks ------------------------


def test_rollout_section(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(
        "rollout:\n"
        "  waves: [1, '10%', '100%']\n"
        "  max_failures: 10%\n"
        "  confirm_timeout: 45\n"
        "  health_checks: false\n"
    )
    config = load_config(path, search_from=tmp_path)
    assert config.rollout == RolloutConfig(
        waves=("1", "10%", "100%"), max_failures="10%", confirm_timeout=45.0, health_checks=False
    )
    path.write_text("rollout:\n  waves: '1, 50%,100%'\n  max_failures: 2\n")
    config = load_config(path, search_from=tmp_path)
    assert config.rollout == RolloutConfig(waves=("1", "50%", "100%"), max_failures="2")
    path.write_text("rollout: {}\n")
    assert load_config(path, search_from=tmp_path).rollout == RolloutConfig()
    assert CiConfig().rollout == RolloutConfig()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rollout: 5\n", "setting 'rollout' must be a mapping"),
        ("rollout: [1]\n", "setting 'rollout' must be a mapping"),
        ("rollout:\n  wave: [1]\n", "unknown setting 'rollout.wave' (known: rollout.waves, "),
        ("rollout:\n  waves: [1, x, '100%']\n", "setting 'rollout.waves' entry 2 ('x')"),
        ("rollout:\n  waves: '1,10%'\n", "setting 'rollout.waves' the last entry must be 100%"),
        ("rollout:\n  waves: []\n", "setting 'rollout.waves' no waves given"),
        ("rollout:\n  waves: [1, true]\n", "setting 'rollout.waves' must be a list"),
        ("rollout:\n  max_failures: -1\n", "setting 'rollout.max_failures' must be a number"),
        ("rollout:\n  max_failures: 150%\n", "setting 'rollout.max_failures'"),
        ("rollout:\n  confirm_timeout: 0\n", "setting 'rollout.confirm_timeout' must be a number"),
        ("rollout:\n  confirm_timeout: '30'\n", "setting 'rollout.confirm_timeout'"),
        ("rollout:\n  confirm_timeout: true\n", "setting 'rollout.confirm_timeout'"),
        ("rollout:\n  health_checks: 'no'\n", "setting 'rollout.health_checks' must be true"),
        ("cache: 5\n", "setting 'cache' must be a store URL or a mapping"),
        ("cache:\n  substituter: https://x\n", "setting 'cache' needs url"),
        ("cache:\n  uri: https://x\n", "unknown setting 'cache.uri' (known: cache.url, "),
        ("cache:\n  url: [1]\n", "setting 'cache.url'"),
    ],
)
def test_bad_section_settings_name_the_key(tmp_path, text, needle):
    path = tmp_path / CONFIG_NAME
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, search_from=tmp_path)
    message = str(info.value)
    assert needle in message and message.startswith(str(path)), message
    assert "\n" not in message and info.value.exit_code == EXIT_USAGE


def test_cache_section(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(
        "cache:\n"
        "  url: s3://fleet-cache?region=eu-west-1\n"
        "  substituter: https://cache.example.org\n"
        "  key: secrets/cache.sec\n"
        "  public_key: cache.example.org-1:AAAA\n"
    )
    config = load_config(path, search_from=tmp_path)
    assert config.cache == CacheConfig(
        url="s3://fleet-cache?region=eu-west-1",
        substituter="https://cache.example.org",
        key=tmp_path / "secrets" / "cache.sec",
        public_key="cache.example.org-1:AAAA",
    )
    path.write_text("cache: file:///srv/cache\n")
    assert load_config(path, search_from=tmp_path).cache == CacheConfig(url="file:///srv/cache")
    assert CiConfig().cache == CacheConfig()


def test_documented_examples_are_valid(tmp_path):
    # ci-templates/README.md's waggle.yaml block and this module's own example
    import runner.gitops.config as module

    readme = (Path(__file__).parent.parent / "ci-templates" / "README.md").read_text()
    block = readme[readme.index("```yaml\nhive:") + len("```yaml\n") :]
    docstring = module.__doc__ or ""
    example = docstring[docstring.index("    hive:") :]
    for text in (block[: block.index("```")], textwrap.dedent(example)):
        config = parse_config(text, source=tmp_path / CONFIG_NAME)
        assert config.rollout.waves == ("1", "10%", "100%")
        assert config.rollout.max_failures == "0" and config.rollout.health_checks is True
