"""Build the Cython hot path in gateway_ext/ (metadata lives in pyproject.toml).

Switches (environment variables, read at build time):
  WS_GATEWAY_NO_EXT=1   build nothing compiled; the pure-Python twins are used.
  WS_GATEWAY_DEBUG=1    build with bounds/wraparound checks and line tracing, -O0 -g.
  WS_GATEWAY_ANNOTATE=1 write Cython's HTML annotation next to each .pyx.

The load tool's compiled client (benchmarks/loadtool/_fastclient.pyx) is built only by
`build_ext --inplace` from a source checkout, where the load tool runs from: it is not
part of the installed packages (pyproject includes gateway* and gateway_ext only), and the
tool falls back to its pure-Python client without it.
"""
import os
import sys

from setuptools import Extension, setup

LOADTOOL_EXT_MODULES = ["_fastclient"]
EXT_MODULES = ["_mask_c", "_utf8_c", "_frames_c", "_encode_c", "_protocol_c", "_stream_c"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def extensions():
    if _flag("WS_GATEWAY_NO_EXT"):
        return []
    from Cython.Build import cythonize

    debug = _flag("WS_GATEWAY_DEBUG")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "embedsignature": True,
        "linetrace": debug,
    }
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else []
    exts = [
        Extension(f"gateway_ext.{name}", [f"gateway_ext/{name}.pyx"], extra_compile_args=cflags, define_macros=macros)
        for name in EXT_MODULES
        if os.path.exists(f"gateway_ext/{name}.pyx")
    ]
    if "--inplace" in sys.argv or "-i" in sys.argv:
        exts += [
            Extension(f"benchmarks.loadtool.{name}", [f"benchmarks/loadtool/{name}.pyx"], extra_compile_args=cflags)
            for name in LOADTOOL_EXT_MODULES
            if os.path.exists(f"benchmarks/loadtool/{name}.pyx")
        ]
    return cythonize(exts, compiler_directives=directives, annotate=_flag("WS_GATEWAY_ANNOTATE"))


setup(ext_modules=extensions())
