"""The native part of the build; everything else is in pyproject.toml.

The extensions live here rather than in pyproject.toml because setuptools
still calls ``[tool.setuptools.ext-modules]`` experimental.
"""

from setuptools import Extension, setup

CFLAGS = ["-Wall", "-Wextra", "-Werror", "-O2"]

setup(
    ext_modules=[
        # The dispatcher's drain helper: one call drains every ready eventfd.
        Extension(
            "irqd._drain",
            sources=["daemon/irqd/_drain.c"],
            extra_compile_args=CFLAGS,
        ),
        # The relay thread: eventfds to client sockets without the interpreter.
        Extension(
            "irqd._hotloop",
            sources=["daemon/irqd/_hotloop.c"],
            extra_compile_args=[*CFLAGS, "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ],
)
