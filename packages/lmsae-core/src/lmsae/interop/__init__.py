"""Conversion between lmsae dictionaries and other libraries' file formats."""

from lmsae.interop.saelens import export_saelens, import_saelens

__all__ = ["export_saelens", "import_saelens"]
