"""influence_pipeline: training-data attribution for PyTorch models as a cached Dagster pipeline."""

__version__ = "0.1.0"
