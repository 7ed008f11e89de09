"""User-facing errors: the CLI prints them as one line and exits non-zero, never as a traceback."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's first line, '' when it has none (transformers' and datasets' messages run to paragraphs)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


class RefdpoError(Exception):
    """An error caused by the user's input (config, data, paths), reported without a traceback."""


class ConfigError(RefdpoError):
    """A bad configuration value or file."""


class Interrupted(RefdpoError):
    """A run stopped by a signal (Ctrl-C, SIGTERM) after saving what it could; says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal


class DataError(RefdpoError):
    """A bad record, named by its file, row and field.

    `row` is the 0-based index of the record in its split; `line` the 1-based line of a JSON-lines file.
    `lines` holds one message per bad record when several are reported at once.
    """

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None,
                 line: int | None = None):
        self.source, self.row, self.field, self.line, self.message = source, row, field, line, message
        super().__init__(self.one_line())

    def __reduce__(self):  # errors cross process boundaries (the demo's workers): pickle by the real arguments
        return DataError, (self.source, self.message, self.row, self.field, self.line)

    def one_line(self) -> str:
        where = self.source
        if self.row is not None:
            where += f": row {self.row}"
            if self.line is not None:
                where += f" (line {self.line})"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


class DataErrors(RefdpoError):
    """Several bad records at once, one line each (the first `shown` of `total`)."""

    def __init__(self, errors: list[DataError], total: int):
        self.errors, self.total = errors, total
        lines = [e.one_line() for e in errors]
        if total > len(errors):
            lines.append(f"... and {total - len(errors)} more bad records")
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return DataErrors, (self.errors, self.total)
