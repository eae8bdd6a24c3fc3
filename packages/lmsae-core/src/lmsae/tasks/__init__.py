"""Built-in tasks run by ``lmsae run`` (``task = "..."``)."""
