"""Which client a mode runs: the compiled loops of `_fastclient` or the asyncio protocols.

`--client-impl auto` (the default) uses the compiled module when it is built (`python
setup.py build_ext --inplace`), the target is IPv4 and the mode has a compiled loop;
`compiled` insists (and fails if it cannot), `python` forces the pure-Python client (what
runs where nothing is built). The RESULT line records which one measured (`client_impl`).
Imports nothing from gateway.
"""
import socket

try:
    from . import _fastclient
except ImportError:     # not built: the pure-Python client runs
    _fastclient = None

# Modes with a compiled measurement loop.
COMPILED_MODES = frozenset({"handshake", "fanout", "echo"})


def add_argument(parser) -> None:
    parser.add_argument(
        "--client-impl", choices=("auto", "compiled", "python"), default="auto",
        help="auto: the compiled client loop when built and the mode has one (default); "
             "python: the asyncio client",
    )


def available() -> bool:
    return _fastclient is not None


def impl_for(mode_name: str, params, family: int) -> str:
    """'compiled' or 'python' for this mode and target; raises SystemExit if 'compiled' is impossible."""
    wanted = getattr(params, "client_impl", "auto")
    possible = _fastclient is not None and mode_name in COMPILED_MODES and family == socket.AF_INET
    if wanted == "compiled" and not possible:
        why = ("benchmarks/loadtool/_fastclient is not built (python setup.py build_ext --inplace)"
               if _fastclient is None else f"no compiled loop for mode {mode_name} or target not IPv4")
        raise SystemExit(f"--client-impl compiled: {why}")
    return "compiled" if possible and wanted != "python" else "python"


def module():
    return _fastclient
