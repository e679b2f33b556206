"""Deploy decisions without hosts: goal stages, unchanged detection, skipped nodes."""

from __future__ import annotations

from runner.deploy.activation import CurrentSystem
from runner.deploy.pipeline import _unchanged, goal_stages
from runner.goals import Goal
from runner.results import Stage

NEW = "/nix/store/new-system"
OLD = "/nix/store/old-system"


def test_goal_stages():
    assert goal_stages(Goal.BUILD) == (Stage.EVAL, Stage.BUILD)
    assert goal_stages(Goal.PUSH) == (Stage.EVAL, Stage.BUILD, Stage.PUSH)
    assert goal_stages(Goal.SWITCH) == (
        Stage.EVAL,
        Stage.BUILD,
        Stage.PUSH,
        Stage.KEYS,
        Stage.ACTIVATE,
        Stage.POST_KEYS,
    )
    assert Stage.REBOOT in goal_stages(Goal.BOOT, reboot=True)
    assert Stage.KEYS not in goal_stages(Goal.SWITCH, keys=False)
    assert goal_stages(Goal.UPLOAD_KEYS) == (Stage.KEYS,)
    assert {str(g) for g in Goal} == {
        "build",
        "push",
        "switch",
        "boot",
        "test",
        "dry-activate",
        "upload-keys",
    }


def test_unchanged_rules():
    both = CurrentSystem(current=NEW, profile=NEW)
    running_only = CurrentSystem(current=NEW, profile=OLD)
    boot_only = CurrentSystem(current=OLD, profile=NEW)
    assert _unchanged(Goal.SWITCH, NEW, both)
    assert not _unchanged(Goal.SWITCH, NEW, running_only)  # the profile must still be set
    assert not _unchanged(Goal.SWITCH, NEW, boot_only)
    assert _unchanged(Goal.BOOT, NEW, boot_only)
    assert _unchanged(Goal.TEST, NEW, running_only)
    assert not _unchanged(Goal.DRY_ACTIVATE, NEW, both)  # dry-activate always reports
    assert not _unchanged(Goal.SWITCH, NEW, CurrentSystem(current=None, profile=None))
