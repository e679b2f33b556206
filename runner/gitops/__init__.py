"""GitOps: what a git change does to the fleet (change detection, plans)."""
