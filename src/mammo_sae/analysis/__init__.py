"""The paper's analyses on latent summaries (probe, intervene, fidelity, localize, ...)."""

# The intervention sweep's default k grid: here, not in intervene.py, so that the CLI can show it
# as the `--ks` default without importing intervene (scipy costs seconds at startup).
DEFAULT_KS = (0, 1, 5, 10, 50, 100, 250, 500, 1000, 5000, 10000, 16384)
# The paper's box rule (Mammo-SAE §3: the 95th percentile of each heatmap): what localization
# files written before the threshold was recorded used, and `--threshold p95` reproduces.
PAPER_THRESHOLD = "p95"
# The default: 0.3 x each heatmap's max (the released code's rule), chosen on TRAINING-split AP
# by benchmarks/localization_study.py over layers x rules x latent selections x models x SAE
# seeds (docs/localization.md has the held-out numbers).
DEFAULT_THRESHOLD = "relmax:0.3"
