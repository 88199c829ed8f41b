"""The one exception a user can cause; the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """A bad command or missing precondition: the message names the problem and the fix."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
