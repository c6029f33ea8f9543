"""Errors a user can cause. The CLI prints them as one line, never as a traceback."""


class CxrcfError(Exception):
    """A problem with the user's input, files, configuration or environment.

    The message must name the field, file, row or thing that is wrong.
    """
