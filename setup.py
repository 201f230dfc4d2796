"""Builds qcompile's own C kernels (csrc/) at install time; everything else is in pyproject.toml.

The extension is optional: where it does not compile (no C compiler, a non-x86 CPU) the install goes on
and qcompile runs its pure-torch fallback, which the report names.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("qcompile._nf4", ["csrc/nf4_kernel.c", "csrc/int8_bmm.c", "csrc/wo_gemv.c"], extra_compile_args=["-O3", "-pthread", "-fopenmp"],
                             extra_link_args=["-pthread", "-fopenmp"], optional=True)])
