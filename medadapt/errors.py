"""User-facing errors.

Anything a user can fix (a bad file, a bad option) is raised as :class:`MedadaptError` with a message that
names the file or option and says how to fix it. The CLI prints it as one line and exits with status 2;
everything else is a bug and keeps its traceback.
"""


class MedadaptError(Exception):
    """A mistake in the user's input: one line naming the file or option, and the fix."""
