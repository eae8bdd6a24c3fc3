"""lmsae: sparse dictionaries (SAEs, transcoders, crosscoders, CLTs, Lorsa, MOLT) on LM activations."""

__version__ = "0.1.0"
