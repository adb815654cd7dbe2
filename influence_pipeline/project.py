"""Where the bundled pipeline keeps its state, anchored at the project, not the caller's cwd.

A source checkout (the folder holding ``workspace.yaml`` and ``dagster_home/dagster.yaml``
next to this package) is the project: its Dagster instance is ``<project>/dagster_home``
and its store ``<project>/influence_store``. ``DAGSTER_HOME`` / ``INFLUENCE_STORE`` (or the
CLI's ``--home`` / ``--store``) override them; relative overrides are taken relative to the
current directory, as a user typing them expects. Without a checkout (an installed wheel)
there is no project, and the CLI asks for ``--home``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The package's parent folder, when it is a source checkout of the project.
_CANDIDATE = Path(__file__).resolve().parent.parent


def project_root() -> Path | None:
    """The project checkout this package runs from, or None for an installed package."""
    marker = _CANDIDATE / "dagster_home" / "dagster.yaml"
    return _CANDIDATE if (_CANDIDATE / "workspace.yaml").is_file() and marker.is_file() else None


def default_store() -> str:
    """``INFLUENCE_STORE`` if set (a URL or a path), else ``<project>/influence_store``
    (``./influence_store`` without a checkout)."""
    configured = os.environ.get("INFLUENCE_STORE")
    if configured:
        return configured if "://" in configured else str(Path(configured).resolve())
    root = project_root()
    return str((root or Path.cwd()) / "influence_store")


def default_home() -> Path | None:
    """``DAGSTER_HOME`` if set, else ``<project>/dagster_home``; None without either."""
    configured = os.environ.get("DAGSTER_HOME")
    if configured:
        return Path(configured).resolve()
    root = project_root()
    return root / "dagster_home" if root is not None else None
