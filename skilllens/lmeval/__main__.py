"""``python -m skilllens.lmeval ARGS``: lm_eval's command line with the skilllens model type."""
import sys

from skilllens.lmeval import main

sys.exit(main())
