"""Deploying a built system to hosts.

- `pipeline`: goals, the per-node pipeline (push, keys, activate, ...) and the run-wide limits;
- `push`: closures to a host, only the paths it lacks;
- `activation`: detached activation that survives dropped connections; reboot; the host's
  current system;
- `keys`: deployment.keys, one remote write script per key;
- `exec`: `waggle exec`, one command on many hosts.
"""
