import pytest

from runner.errors import HiveError
from runner.hive.discovery import HiveKind, locate


def test_upward_search_prefers_flake(tmp_path):
    (tmp_path / "hive.nix").write_text("{}")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert locate(None, sub).kind is HiveKind.LEGACY
    (tmp_path / "flake.nix").write_text("{}")
    found = locate(None, sub)
    assert found.kind is HiveKind.FLAKE and found.ref == str(tmp_path)


def test_config_forms(tmp_path):
    (tmp_path / "hive.nix").write_text("{}")
    (tmp_path / "other.nix").write_text("{}")
    assert locate("other.nix", tmp_path).ref == str(tmp_path / "other.nix")
    assert locate(str(tmp_path), tmp_path).ref == str(tmp_path / "hive.nix")
    flake_dir = tmp_path / "f"
    flake_dir.mkdir()
    (flake_dir / "flake.nix").write_text("{}")
    assert locate("f/flake.nix", tmp_path).kind is HiveKind.FLAKE
    assert locate("f", tmp_path).kind is HiveKind.FLAKE
    ref = locate("github:owner/repo", tmp_path)
    assert ref.kind is HiveKind.FLAKE and ref.ref == "github:owner/repo"


def test_nothing_found(tmp_path):
    with pytest.raises(HiveError, match="no hive found"):
        locate(None, tmp_path)
    with pytest.raises(HiveError, match=r"missing\.nix"):
        locate("missing.nix", tmp_path)
