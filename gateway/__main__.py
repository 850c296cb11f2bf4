"""`python -m gateway` is `ws-gateway`."""
import sys

from gateway.cli import main

sys.exit(main())
