"""`python -m demo [--quick | --gpu] [--work-dir DIR] [--fresh]`: see demo/experiment.py."""

import sys

from demo.experiment import main

sys.exit(main())
