"""Module-level ``defs`` for ``dagster dev`` / ``workspace.yaml``: the bundled digits workload.

Importing it trains nothing and writes nothing (the example's files and model are made on
first use). The store is ``INFLUENCE_STORE`` if set, else ``<project>/influence_store``
(see ``influence_pipeline.project``). Point the pipeline at your own model and data with
``build_definitions(my_workload)`` from your own module (see README.md).
"""

from .defs import build_definitions
from .examples.digits import digits_workload
from .project import default_store

workload = digits_workload(store=default_store())
defs = build_definitions(workload)
