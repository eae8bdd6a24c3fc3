"""Sparse dictionaries: the contract (:class:`SparseDictionary`) and saving/loading."""

from lmsae.dictionary.base import SparseDictionary
from lmsae.dictionary.io import load_dictionary, save_dictionary

__all__ = ["SparseDictionary", "load_dictionary", "save_dictionary"]
