"""All modes by name. Add a mode here (modes.py describes the interface).

Separate from modes.py because mode modules import the interface from there.
"""
from .churn import ChurnMode
from .echo import EchoMode
from .fanout import FanoutMode
from .handshake import HandshakeMode
from .idle import IdleMode
from .slow import SlowMode

MODES = {mode.name: mode for mode in (EchoMode(), HandshakeMode(), FanoutMode(), IdleMode(), ChurnMode(), SlowMode())}
