"""The one exception type users see.

Every error caused by user input (paths, data, settings) is raised as
`DefectFillError` with a message naming the file and the fix; the CLI prints
the message and exits with status 2 instead of a traceback.
"""


class DefectFillError(Exception):
    """A problem with the user's input, explained in the message."""
