"""``python -m simmim`` (and ``accelerate launch -m simmim``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
