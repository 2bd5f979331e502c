"""The paper's analyses on latent summaries (probe, intervene, fidelity, localize, ...)."""

# The intervention sweep's default k grid: here, not in intervene.py, so that the CLI can show it
# as the `--ks` default without importing intervene (scipy costs seconds at startup).
DEFAULT_KS = (0, 1, 5, 10, 50, 100, 250, 500, 1000, 5000, 10000, 16384)
