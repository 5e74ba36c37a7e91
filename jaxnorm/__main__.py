"""`python -m jaxnorm`: the jaxnorm command line (see `jaxnorm.cli`)."""

import sys

from jaxnorm.cli import main

if __name__ == "__main__":
  sys.exit(main())
