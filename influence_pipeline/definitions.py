"""Module-level ``defs`` for ``dagster dev`` / ``workspace.yaml``: a bundled workload.

``INFLUENCE_EXAMPLE`` chooses it: ``digits`` (the default), ``tiny-gpt`` (the GPT
example: a byte-level causal transformer, held-out sequences attributed to training
sequences with EK-FAC) or ``digits-memorizing`` (10 % flipped labels, an MLP that memorizes
them, the audit ranked by the mean loss over its saved checkpoints). Importing it trains
nothing and writes nothing (the example's files and model are made on first use). The
store is ``INFLUENCE_STORE`` if set, else ``<project>/influence_store`` (see
``influence_pipeline.project``). Point the pipeline at your own model and data with
``build_definitions(my_workload)`` from your own module (see README.md).
"""

import os

from .defs import build_definitions
from .examples.digits import digits_workload
from .project import default_store
from .workload import Workload

#: The bundled workloads, by the name ``--example`` / ``INFLUENCE_EXAMPLE`` take.
EXAMPLES = ("digits", "tiny-gpt", "digits-memorizing")
#: The GPT example's corpus is cut to this many bytes here (about 1,500 training windows
#: of 64 bytes) so that a first run, which trains the model, stays within minutes.
TINY_GPT_BYTES = 100_000


def example_workload(name: str, store: str) -> Workload:
    """The bundled workload ``name`` writing into ``store``."""
    if name == "digits":
        return digits_workload(store=store)
    if name == "tiny-gpt":
        from .examples.tiny_gpt import tiny_gpt_workload

        return tiny_gpt_workload(store=store, max_bytes=TINY_GPT_BYTES)
    if name == "digits-memorizing":
        from .examples.digits_memorizing import memorizing_workload

        return memorizing_workload(store=store)
    raise ValueError(f"example={name!r} is not one of {', '.join(EXAMPLES)}.")


workload = example_workload(os.environ.get("INFLUENCE_EXAMPLE") or "digits", default_store())
defs = build_definitions(workload)
