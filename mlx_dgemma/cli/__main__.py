"""`python -m mlx_dgemma.cli`: the `dgemma` console script."""

import sys

from . import main

sys.exit(main())
