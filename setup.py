"""The native part of the build; everything else is in pyproject.toml.

The extension lives here rather than in pyproject.toml because setuptools
still calls ``[tool.setuptools.ext-modules]`` experimental.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The dispatcher's drain helper: one call drains every ready eventfd.
        Extension(
            "irqd._drain",
            sources=["daemon/irqd/_drain.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2"],
        ),
    ],
)
