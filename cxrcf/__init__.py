"""cxrcf: causal counterfactual chest X-ray generators with hard and soft counterfactual fine-tuning.

The package root stays import-light (no torch, Ray or MLflow) so that `cxrcf --help` is fast.
"""

__version__ = "0.1.0"
