"""Errors of the artifact store; each message names the artifact and what is wrong."""

from __future__ import annotations


class StoreError(ValueError):
    """A store operation cannot be done as asked (missing store, unknown test set, ...)."""


class ProvenanceMismatchError(StoreError):
    """An artifact was produced for another model, method, block structure or data."""


class IncompleteArtifactError(StoreError):
    """An artifact (factors of a test set, scores of a shard) is not marked complete."""


class StaleArtifactError(IncompleteArtifactError):
    """An artifact is complete but was computed from other inputs than the current ones
    (other factors, another fitted block mapper or loss): it is never served."""


class StoreCorruptionError(StoreError):
    """Stored bytes fail their checksum, cannot be decoded, or a chunk file is missing."""
