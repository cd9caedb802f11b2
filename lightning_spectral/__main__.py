import sys

from lightning_spectral.cli import main

sys.exit(main())
