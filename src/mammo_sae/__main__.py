"""`python -m mammo_sae ...` is the `mammo-sae` command (for hosts without the console script)."""

import sys

from .cli import main

sys.exit(main())
