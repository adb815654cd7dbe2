"""Module-level ``defs`` for ``dagster dev`` / ``workspace.yaml``: the bundled digits workload.

Point the pipeline at your own model and data with ``build_definitions(my_workload)`` from
your own module (see README.md). ``INFLUENCE_STORE`` overrides the store location.
"""

import os

from .defs import build_definitions
from .examples.digits import digits_workload

workload = digits_workload(store=os.environ.get("INFLUENCE_STORE", "influence_store"))
defs = build_definitions(workload)
