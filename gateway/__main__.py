"""`python -m gateway` is `ws-gateway`."""
import sys

from .cli import main

sys.exit(main())
