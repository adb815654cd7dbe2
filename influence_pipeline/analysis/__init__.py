"""pandas analysis of stored influence scores: tidy tables, the data audit, plots."""
