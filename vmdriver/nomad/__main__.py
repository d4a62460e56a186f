"""``python -m vmdriver.nomad``: the plugin executable (driver name ``vmdriver``)."""

import sys

from vmdriver.nomad.server import main

sys.exit(main())
