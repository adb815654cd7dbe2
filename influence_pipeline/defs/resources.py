"""Dagster resources: the artifact store."""

import json

import dagster as dg

from ..store import InfluenceStore


class InfluenceStoreResource(dg.ConfigurableResource):
    """The workload's Zarr artifact store: a local path (relative to the code location's
    working directory) or an fsspec URL such as ``s3://bucket/prefix``."""

    root: str = "influence_store"
    storage_options_json: str = "{}"

    def open(self, mode: str = "a") -> InfluenceStore:
        return InfluenceStore(
            self.root, mode=mode, storage_options=json.loads(self.storage_options_json)
        )
