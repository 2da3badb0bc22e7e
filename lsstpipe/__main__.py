"""``python -m lsstpipe`` is the ``lsstpipe`` command."""

import sys

from lsstpipe.cli import main

sys.exit(main())
