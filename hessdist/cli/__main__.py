"""``python -m hessdist.cli``: the same as the ``hessdist`` command."""
import sys

from . import main

sys.exit(main())
