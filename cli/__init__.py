"""The ``loyalty`` command line: one module per group of commands (see README, Layout)."""
