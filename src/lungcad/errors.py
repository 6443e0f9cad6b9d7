"""Errors that mean the user gave us something we cannot use.

The CLI turns these into one line and exit code 2; anything else is a bug and keeps
its traceback.
"""


class LungcadError(Exception):
    """A user-facing problem: bad file, bad option, missing data. Message names the culprit."""
