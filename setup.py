"""Builds qtool's one C extension (qtool/_native.c: fused quantize and merge loops). Metadata is in
pyproject.toml. The extension is optional: without a C compiler qtool installs and runs its torch path, which
gives the same bytes, only slower."""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    args = ["/O2", "/fp:precise"]
else:
    # -ffp-contract=off: never fuse a*b+c, the torch ops it mirrors round each step
    args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]

setup(ext_modules=[Extension("qtool._native", ["qtool/_native.c"], extra_compile_args=args, optional=True)])
