"""The one exception type the ``reconstruct`` command turns into a one-line message and exit code 2.

Anything raised as ``UserError`` is a problem with the user's input or environment (a missing folder, a file that
is not an image, no CUDA, too many frames for the device), not a bug: the user needs the sentence, not the
traceback. Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(error)`` is one line naming it and, where possible, the fix."""
