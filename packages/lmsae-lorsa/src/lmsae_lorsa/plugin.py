"""What lmsae-lorsa adds to lmsae: the ``lorsa`` architecture, the ``lorsa_init`` task and the
``lmsae lorsa ...`` commands.

Imports are deferred so that discovering plugins (``lmsae --help``) stays fast.
"""

from __future__ import annotations

from lmsae.hookspecs import hookimpl


@hookimpl
def lmsae_register_architectures():
    from lmsae_lorsa.spec import LORSA_SPEC

    return [LORSA_SPEC]


@hookimpl
def lmsae_register_tasks():
    from lmsae_lorsa.tasks import LORSA_INIT_SPEC

    return [LORSA_INIT_SPEC]


@hookimpl
def lmsae_register_commands(cli):
    from lmsae_lorsa.commands import register

    register(cli)
