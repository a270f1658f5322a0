"""``python -m trionet`` is ``python -m trionet.serve``."""

import sys

from .serve import main

sys.exit(main())
