from lmsae.testing import ArchitectureContract


class TestTied(ArchitectureContract):
    architecture = "tied"
