"""Errors a user can cause at run time (a missing file, an empty dataset, ...).

The CLI prints them as one line naming the thing and the fix, and exits 1; a traceback is for
bugs. Configuration mistakes are `hiervl.config.ConfigError` (exit 2).

Owns: `UserError`.
Must not touch: anything else.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
