"""What lmsae-molt adds to lmsae: the ``molt`` architecture."""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae_molt.spec import MOLT_SPEC

    return [MOLT_SPEC]
