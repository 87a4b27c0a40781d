"""``python -m ftforget ...`` is the ``ftforget`` command (e.g. under ``torchrun -m ftforget measure``)."""

import sys

from ftforget.commands import main

sys.exit(main())
