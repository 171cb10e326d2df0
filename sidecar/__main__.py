"""``python -m sidecar`` is the same as the ``dns-sidecar`` command."""

import sys

from sidecar.cli import main

sys.exit(main())
