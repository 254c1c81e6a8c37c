"""The one user-facing error type.

Anything a user can get wrong (a recipe key, a file path, a mesh size) raises
``LongctxError`` with a single line that names the problem, the value and the fix. The CLI
prints it as ``error: ...`` and exits with code 2; library callers may catch it.
"""


class LongctxError(ValueError):
    """A one-line, user-facing error: what is wrong, the value involved, and how to fix it."""
