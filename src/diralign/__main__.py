"""``python -m diralign ...`` (what ``torchrun -m diralign`` launches)."""

import sys

from .cli import main

sys.exit(main())
