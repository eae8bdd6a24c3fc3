"""Built-in components of lmsae-core, registered like any plugin."""

from __future__ import annotations

from lmsae.hookspecs import hookimpl
from lmsae.tasks import init as init_task


@hookimpl
def lmsae_register_tasks():
    return [init_task.SPEC]
