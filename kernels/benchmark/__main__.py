"""``python -m kernels.benchmark``: run the benchmark on the command line's arguments."""

import sys

from kernels.benchmark import main

sys.exit(main())
