"""The errors esmloc's tools report to a person, apart from bugs: what went wrong is the user's input, or the world
around it. Imports nothing but the standard library, so that any module (and a tool's argument check) can raise them.

- `InputError`: the user's input cannot be used (a data file, a model directory, an argument, an output path). The
  tool prints one line naming what is wrong and where (file, line, ACC, argument) and exits with status 2.
- `DataValidationError`: an `InputError` about records of a data file, listing the first problems found.
- `EnvironmentProblem`: something outside the input failed (network, hub, disk, permissions); one line, status 1.

Anything else is a bug and keeps its traceback (`esmloc.cli.run`).
"""


class InputError(Exception):
    """Input that cannot be used; the message says what and where (file, line, ACC, argument), and how to fix it."""

    exit_code = 2


class EnvironmentProblem(Exception):
    """A failure outside the user's input (network, hub, disk, permissions); the message says what to do."""

    exit_code = 1


class DataValidationError(InputError, ValueError):
    """Bad records in a data file. `problems` lists the first few problems found (file, line, ACC, what), `count` all
    of them. A ValueError too, as the `datasets` builder and older callers expect."""

    def __init__(self, problems: list[str], count: int | None = None):
        self.problems = problems
        self.count = len(problems) if count is None else count
        if self.count == 1 and len(problems) == 1:
            message = problems[0]
        else:
            shown = f" (the first {len(problems)} below)" if self.count > len(problems) else ""
            message = f"{self.count} problem(s) in the data{shown}:\n  " + "\n  ".join(problems)
        super().__init__(message)


__all__ = ["DataValidationError", "EnvironmentProblem", "InputError"]
