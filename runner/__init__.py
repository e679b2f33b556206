"""Waggle: a CI/GitOps deployment runner for NixOS fleets."""

__version__ = "0.1.0"
