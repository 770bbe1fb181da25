"""The project's user-facing error."""


class DreamBoothError(Exception):
    """A problem the user can fix: bad flag, bad file, missing package.

    The message is one line naming the flag or file and what to do; the
    scripts' entry points print it without a traceback.
    """
