"""Entry point for granian: `granian --interface wsgi --uds SOCK authsvc.wsgi:app` with BASTION_DATA_DIR set."""

import os
from pathlib import Path

from authsvc import logconfig
from authsvc.gate import Gate

logconfig.configure()
app = Gate.from_data_dir(Path(os.environ["BASTION_DATA_DIR"]))
