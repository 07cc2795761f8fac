"""`python -m pipelines.bench`: the same as `posttrain bench`."""

import sys

from pipelines.bench.cli import main

sys.exit(main())
