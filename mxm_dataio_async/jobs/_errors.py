"""The error a job file raises when it cannot run as written."""

from __future__ import annotations

from collections.abc import Sequence

from mxm_dataio_async._exceptions import DataIOError

__all__ = ["JobConfigError"]


class JobConfigError(DataIOError, ValueError):
    """A job file (or config) is invalid; nothing ran.

    ``file`` names the job file, ``problems`` lists ``(key_path, problem)`` pairs such as
    ``("requests[0].expand.dates.chunk", "chunk must be positive, got '0d'")``; ``key`` and
    ``problem`` are the first pair's. YAML syntax errors set ``line`` and ``column`` (1-based).
    """

    def __init__(
        self,
        file: str,
        problems: Sequence[tuple[str, str]],
        *,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        if not problems:
            raise ValueError("a JobConfigError needs at least one problem")
        self.file = file
        self.problems = list(problems)
        self.line = line
        self.column = column
        super().__init__(self._message())

    @property
    def key(self) -> str:
        return self.problems[0][0]

    @property
    def problem(self) -> str:
        return self.problems[0][1]

    def _message(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        if len(self.problems) == 1:
            key, problem = self.problems[0]
            return f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        lines = [f"{where}: {len(self.problems)} problems:"]
        lines.extend(
            f"  {key}: {problem}" if key else f"  {problem}" for key, problem in self.problems
        )
        return "\n".join(lines)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.file, self.problems, self.line, self.column))


def _rebuild(
    file: str, problems: list[tuple[str, str]], line: int | None, column: int | None
) -> JobConfigError:
    return JobConfigError(file, problems, line=line, column=column)
