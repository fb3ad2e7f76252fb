from __future__ import annotations

import sys

from monai_twin.apps.cli import main

sys.exit(main())
