"""serving package of cxrcf (see docs/CONTRACTS.md)."""
