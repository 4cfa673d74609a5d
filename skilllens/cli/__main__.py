"""``python -m skilllens.cli ...`` runs the same commands as the ``skilllens`` entry point."""
import sys

from skilllens.cli import main

if __name__ == "__main__":
    sys.exit(main())
