"""What every absl driver shares: user mistakes end in one line and a non-zero exit."""

import functools
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def user_errors(main):
    """Wraps an absl `main` so a user error prints `error: ...` and exits 2, without traceback.

    Set `TF_PIGGYBACK_DEBUG=1` to see the traceback instead.
    """

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("TF_PIGGYBACK_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
