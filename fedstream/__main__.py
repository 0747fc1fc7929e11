"""`python -m fedstream` runs the command-line interface."""

import sys

from fedstream.cli import main

sys.exit(main())
