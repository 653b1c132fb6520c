"""``python -m fusedopt.backends.triton``: tune the Triton launch rows of this GPU ahead of time
(see :mod:`fusedopt.backends.triton.tuning`; ``--help`` for the options)."""
import sys

from .tuning import main

sys.exit(main())
