"""Build script for the optional compiled UDP fast path (everything else is in pyproject.toml).

The extension is ``optional``: without a C compiler (or Python headers) the build logs a
warning and the package installs as pure Python; ``sidecar.dns.fastudp`` then says at start
that the Python path runs. It is Linux-only (recvmmsg/sendmmsg).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension(
        "sidecar.dns._fastudp", ["sidecar/dns/_fastudp.c"], optional=True,
        extra_compile_args=["-O2", "-Wall", "-fno-strict-aliasing"]))

setup(ext_modules=ext_modules)
