"""The one exception type for mistakes the user can fix.

Commands catch it at the top level and print its message as one line (no traceback
unless HYBRIDPRUNE_DEBUG=1) and exit non-zero. Its message says what was wrong and
what to do about it.
"""


class UserError(Exception):
    """Bad input or an environment problem the user can fix; the message is shown as is."""

    exit_code = 2
