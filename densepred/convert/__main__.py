"""`python -m densepred.convert SRC DST`: see `densepred.convert.cli`."""

import sys

from densepred.convert.cli import main

sys.exit(main())
