"""Loading a job: YAML (duplicate keys refused), ``${ENV}``, then two validation passes.

Both passes run before anything else: pydantic checks the shape (unknown keys, types, ranges),
then ``compile_job`` checks the meaning (sources that exist, dates in order, placeholders that are
defined, adapters that import, a first request that builds). Every problem of every stage is
reported at once, in one ``JobConfigError`` naming the file and each key path: when the shape is
wrong, the meaning is checked on a repaired copy (``_repair.py``), so fixing one problem does not
reveal the next.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mxm_dataio_async.jobs._config import JobConfig, interpolate_env, pydantic_problem
from mxm_dataio_async.jobs._errors import JobConfigError
from mxm_dataio_async.jobs._expand import job_problems
from mxm_dataio_async.jobs._repair import related, repair

__all__ = ["job_from_data", "load_job", "parse_job"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_error(file: str, exc: yaml.YAMLError) -> JobConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return JobConfigError(file, [("", text)])
    return JobConfigError(file, [("", text)], line=mark.line + 1, column=mark.column + 1)


def parse_job(
    text: str,
    *,
    file: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> JobConfig:
    """Parse and validate a job from YAML text; ``JobConfigError`` names every problem.

    ``base_dir`` anchors relative paths (default: the current directory); ``env`` replaces
    ``os.environ`` for ``${NAME}`` interpolation.
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from None
    return job_from_data(data, file=file, base_dir=base_dir, env=env)


def job_from_data(
    data: Any,
    *,
    file: str = "<config>",
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> JobConfig:
    """Validate a job given as plain data (what the YAML holds); see ``parse_job``."""
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}"
        raise JobConfigError(
            file, [("", f"a job file is a mapping (job:, sources:, ...), not {what}")]
        )
    env_errors: list[tuple[str, str]] = []
    data = interpolate_env(data, os.environ if env is None else env, env_errors)
    # A value whose ${NAME} is missing is reported once, by the environment check.
    unresolved = [key for key, _ in env_errors]
    problems = list(env_errors)
    repaired: list[str] = []
    echoes: list[str] = []
    try:
        config: JobConfig | None = JobConfig.model_validate(data)
    except ValidationError as exc:
        shape = [pydantic_problem(e) for e in exc.errors()]
        problems += [
            (key, text) for key, text in shape if not related(key, unresolved, containing=True)
        ]
        config, repaired, echoes = repair(data, exc)
    if config is not None:
        config._file = file
        config._base_dir = Path(base_dir) if base_dir is not None else None
        meaning, _ = job_problems(config)
        # Leave out what a reported problem explains: a value left unresolved (and its
        # source or request as a whole), a place repaired (and what is inside it), an
        # expansion "never used" once its request lost a template.
        problems += [
            (key, text)
            for key, text in meaning
            if not related(key, unresolved, containing=True)
            and not related(key, repaired)
            and not (key in echoes and "never used" in text)
        ]
    if problems:
        raise JobConfigError(file, problems)
    assert config is not None
    return config


def load_job(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> JobConfig:
    """Read and validate a job file; ``JobConfigError`` (file, key path, problem) if invalid.

    Relative paths inside it (``store``, a file source's ``root``) are taken from the file's
    folder.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise JobConfigError(str(path), [("", f"cannot read the job file: {reason}")]) from None
    return parse_job(text, file=str(path), base_dir=p.resolve().parent, env=env)
