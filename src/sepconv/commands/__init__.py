"""Subcommands of the ``sepconv`` CLI, one module each (see ``sepconv.cli``)."""
