"""The two kinds of failure the CLI distinguishes (SPEC §1: exit 2 for bad input, exit 1 for failed work)."""


class GptqError(Exception):
    """The work failed (exit code 1). The message is one line saying what went wrong."""

    exit_code = 1


class UsageError(GptqError):
    """Bad usage or bad input (exit code 2). The message says what is wrong and what to do."""

    exit_code = 2
