"""lmsae-crosscoder: crosscoders for lmsae.

A crosscoder reads several heads (hook points of one model, or the same hook point of several
models), sums their encodings into one sparse code, and reconstructs every head from that code
with its own decoder. See :mod:`lmsae_crosscoder.model` for the maths.
"""

from lmsae_crosscoder.config import CrosscoderConfig
from lmsae_crosscoder.model import Crosscoder

__all__ = ["Crosscoder", "CrosscoderConfig"]
