"""``python -m lmsae ...`` is the ``lmsae`` command (what ``torchrun -m lmsae run config.toml`` starts)."""

from lmsae.cli import main

if __name__ == "__main__":
    main()
