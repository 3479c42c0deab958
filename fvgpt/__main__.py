"""`python -m fvgpt`: the `fvgpt` command."""
import sys

from .cli import main

sys.exit(main())
