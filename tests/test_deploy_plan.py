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
    # Waggle recorded the activations as successful (and confirmed) on the host.
    both = CurrentSystem(current=NEW, profile=NEW, activated=NEW, activated_boot=NEW)
    running_only = CurrentSystem(current=NEW, profile=OLD, activated=NEW, activated_boot=OLD)
    boot_only = CurrentSystem(current=OLD, profile=NEW, activated=OLD, activated_boot=NEW)
    assert _unchanged(Goal.SWITCH, NEW, both)
    assert not _unchanged(Goal.SWITCH, NEW, running_only)  # the profile must still be set
    assert not _unchanged(Goal.SWITCH, NEW, boot_only)
    assert _unchanged(Goal.BOOT, NEW, boot_only)
    assert _unchanged(Goal.TEST, NEW, running_only)
    assert not _unchanged(Goal.DRY_ACTIVATE, NEW, both)  # dry-activate always reports
    assert not _unchanged(Goal.SWITCH, NEW, CurrentSystem(current=None, profile=None))


def test_only_a_recorded_activation_counts_as_unchanged():
    # The links point at the system, but no Waggle run recorded that activating it worked
    # (a switch that failed half-way, a rollback that was never confirmed, another tool).
    half = CurrentSystem(current=NEW, profile=NEW, activated=None, activated_boot=NEW)
    assert not _unchanged(Goal.SWITCH, NEW, half)
    assert not _unchanged(Goal.TEST, NEW, half)
    assert _unchanged(Goal.BOOT, NEW, half)
    other = CurrentSystem(current=NEW, profile=NEW, activated=OLD, activated_boot=OLD)
    assert not _unchanged(Goal.SWITCH, NEW, other)
    assert not _unchanged(Goal.BOOT, NEW, other)


def test_goal_stages_of_safe_rollouts():
    head = (Stage.EVAL, Stage.BUILD, Stage.PUSH, Stage.KEYS, Stage.ACTIVATE)
    assert goal_stages(Goal.SWITCH, rollback=True, health=True) == (
        *head,
        Stage.HEALTH,
        Stage.CONFIRM,
        Stage.POST_KEYS,
    )
    assert Stage.CONFIRM in goal_stages(Goal.TEST, rollback=True)
    assert Stage.CONFIRM not in goal_stages(Goal.BOOT, rollback=True)  # nothing runs yet
    assert Stage.CONFIRM not in goal_stages(Goal.DRY_ACTIVATE, rollback=True)
    # A reboot would end the host's wait: no live rollback; health checks after the reboot.
    rebooted = goal_stages(Goal.BOOT, reboot=True, rollback=True, health=True)
    assert rebooted[-3:] == (Stage.REBOOT, Stage.HEALTH, Stage.POST_KEYS)
    assert Stage.CONFIRM not in goal_stages(Goal.SWITCH, reboot=True, rollback=True)
    assert Stage.HEALTH not in goal_stages(Goal.DRY_ACTIVATE, health=True)
