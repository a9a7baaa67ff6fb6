"""`python -m frugallm` (what torchrun runs: `torchrun --nproc-per-node N -m frugallm train ...`)."""

import sys

from .cli import main

sys.exit(main())
