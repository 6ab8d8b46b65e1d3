"""Sub-commands that live outside cli.py; each module exposes `register(app)`."""

COMMAND_MODULES = ("fix", "merge", "schema", "convert", "env")
