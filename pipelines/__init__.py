"""pipelines package of cxrcf (see docs/CONTRACTS.md)."""
