"""`python -m cli`: the same as the `gpu-router` console script."""

import sys

from cli.main import main

sys.exit(main())
