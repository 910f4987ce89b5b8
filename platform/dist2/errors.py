"""Errors a user can fix: the CLI prints them as one line and exits with code 2, never a traceback."""


class UserError(Exception):
    """A mistake in a config file, a path, a command-line argument or an input file.

    The message must name the file, key or value at fault and what is allowed instead.
    """

    exit_code = 2


class RunFailed(UserError):
    """A run that started and could not finish (a non-finite loss, workers out of restarts): exit code 1, the
    reason in one line, and the MLflow run marked FAILED with it."""

    exit_code = 1


class WaitedTooLong(UserError):
    """An ablation that waited `--wait-timeout` seconds with no trial running: exit code 3, what it waited for,
    and the `--resume` command (its Tune state is saved)."""

    exit_code = 3
