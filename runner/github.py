"""GitHub Actions workflow commands (`::error title=...::message`): their escaping and limit.

Used by the CI log (`runner.progress.plain`) and by `waggle ci`'s annotations
(`runner.gitops.ci`), so both write the same bytes for the same text.
"""

from __future__ import annotations

from typing import Literal

AnnotationKind = Literal["error", "warning", "notice"]

ANNOTATION_LIMIT = 10  # GitHub shows at most 10 annotations of each kind per step


def escape_data(text: str) -> str:
    """A workflow command's message (actions/toolkit `escapeData`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value (actions/toolkit `escapeProperty`)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(kind: AnnotationKind, title: str, message: str) -> str:
    """One annotation command, e.g. `::error title=web failed::exit 4`, both parts escaped."""
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"
