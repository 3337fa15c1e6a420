"""``python -m drm_lightning.cli`` runs ``drm-merge``."""

import sys

from drm_lightning.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
