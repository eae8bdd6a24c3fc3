"""What lmsae-clt adds to lmsae: the ``clt`` architecture and the ``lmsae clt ...`` commands.

Imports are deferred so that discovering plugins (``lmsae --help``) stays fast.
"""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae_clt.model import CLT_SPEC

    return [CLT_SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae_clt.commands import register

    register(cli)
