"""`python -m lumen`: the same as the `lumen` command."""
import sys

from lumen.cli import main

sys.exit(main())
