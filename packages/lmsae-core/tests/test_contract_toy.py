"""The core's own toy architecture passes the shipped contract (the kit tests itself)."""

from lmsae.testing import ArchitectureContract


class TestToy(ArchitectureContract):
    architecture = "toy"
    plugins = ("lmsae.testing.toy",)
