"""``python -m benchmarks``: run the benchmark suite and print its summary (``benchmarks.summary``)."""

import sys

from benchmarks.summary import main

sys.exit(main())
