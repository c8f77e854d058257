class KDError(Exception):
    """A mistake the user can fix (a bad value, a missing file): shown as one line, no traceback."""
