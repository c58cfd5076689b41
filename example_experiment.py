"""Thin entry point of the toolkit's command line; see `python example_experiment.py --help`."""

import sys

from phasediagram.__main__ import console

if __name__ == "__main__":
    sys.exit(console())
