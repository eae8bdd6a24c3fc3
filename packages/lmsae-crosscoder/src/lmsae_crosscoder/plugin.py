"""What lmsae-crosscoder adds to lmsae: the ``crosscoder`` architecture, the ``crosscoder_heads``
activation source and the ``lmsae crosscoder`` commands."""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae_crosscoder.spec import CROSSCODER_SPEC

    return [CROSSCODER_SPEC]


@hookimpl
def lmsae_register_sources():
    from lmsae_crosscoder.sources import HEADS_SOURCE_SPEC

    return [HEADS_SOURCE_SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae_crosscoder.commands import register

    register(cli)
