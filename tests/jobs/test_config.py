"""Job files are validated before anything runs: one JobConfigError naming file, key, problem."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mxm_dataio_async import DataIOError
from mxm_dataio_async.jobs import JobConfigError, JobPlan, job_from_data, load_job, parse_job
from tests.jobs.conftest import JobServer, bars_job, cli, write_job

URL = "http://127.0.0.1:9"
README = Path(__file__).resolve().parents[2] / "README.md"


def error_of(tmp_path: Path, data: dict[str, Any] | str) -> JobConfigError:
    path = tmp_path / "job.yaml"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        write_job(path, data)
    with pytest.raises(JobConfigError) as info:
        load_job(path)
    err = info.value
    assert isinstance(err, DataIOError) and isinstance(err, ValueError)
    assert str(err).startswith(str(path)), str(err)
    return err


def edited(**changes: Any) -> dict[str, Any]:
    """The example job with ``changes`` applied at dotted key paths (``a.b.0.c``)."""
    data = bars_job(URL)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return data


_DELETE = object()


def test_the_example_is_valid(tmp_path: Path) -> None:
    config = load_job(write_job(tmp_path / "job.yaml", bars_job(URL)))
    assert config.job == "prices_daily" and config.lease_ttl == 30 and config.concurrency == 16
    assert config.file == str(tmp_path / "job.yaml")
    assert JobPlan(config).total == 9


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        ({"sourcez": {}}, "sourcez", "unknown key 'sourcez'; did you mean 'sources'?"),
        ({"sources__prices__base_uri": URL}, "sources.prices.base_uri", "unknown key 'base_uri'"),
        (
            {"requests__0__expand__dates__chunks": "1d"},
            "requests[0].expand.dates.chunks",
            "unknown key",
        ),
        ({"requests__0__endpointt": "/x"}, "requests[0].endpointt", "unknown key 'endpointt'"),
        ({"concurrency": "many"}, "concurrency", "Input should be a valid integer"),
        ({"concurrency": 0}, "concurrency", "greater than or equal to 1"),
        ({"lease_ttl": -1}, "lease_ttl", "greater than 0"),
        ({"sources__prices__max_concurrency": [1]}, "sources.prices.max_concurrency", "integer"),
        (
            {"sources__prices__retry__max_attempts": 0},
            "sources.prices.retry.max_attempts",
            "greater than or equal to 1",
        ),
        ({"requests__0__cache_mode": "sometimes"}, "requests[0].cache_mode", "'only_if_cached'"),
        ({"requests__0__kind": _DELETE}, "requests[0]", "missing required key 'kind'"),
        ({"requests": []}, "requests", "at least 1 item"),
        ({"requests__0__expand__symbol": []}, "requests[0].expand.symbol", "at least 1 item"),
        (
            {"requests__0__expand__symbol": [{"a": 1}]},
            "requests[0].expand.symbol[0]",
            "not a mapping",
        ),
        (
            {"requests__0__expand__dates__chunk": "0d"},
            "requests[0].expand.dates.chunk",
            "chunk must be positive, got '0d'",
        ),
        (
            {"requests__0__expand__dates__chunk": "-7d"},
            "requests[0].expand.dates.chunk",
            "chunk must be positive, got '-7d'",
        ),
        (
            {"requests__0__expand__dates__chunk": "5m"},
            "requests[0].expand.dates.chunk",
            "write 5mo for calendar months",
        ),
        (
            {"requests__0__expand__dates__chunk": "1q"},
            "requests[0].expand.dates.chunk",
            "unknown unit 'q'",
        ),
        (
            {"requests__0__expand__dates__start": "2024-13-01"},
            "requests[0].expand.dates.start",
            "invalid date",
        ),
        (
            {"requests__0__expand__dates__start": 20240101},
            "requests[0].expand.dates.start",
            "YYYY-MM-DD",
        ),
        (
            {"requests__0__expand__dates__end": "2023-12-31"},
            "requests[0].expand.dates.end",
            "end 2023-12-31 is before start 2024-01-01",
        ),
        (
            {"requests__0__source": "pricez"},
            "requests[0].source",
            "unknown source 'pricez'; defined: prices",
        ),
        (
            {"requests__0__endpoint": "/bars/{sym}"},
            "requests[0].endpoint",
            "undefined placeholder {sym}",
        ),
        (
            {"requests__0__params": {"a": {"b": ["{x}"]}, "s": "{symbol}{start}{end}"}},
            "requests[0].params.a.b[0]",
            "undefined placeholder {x}",
        ),
        (
            {"requests__0__as_of_bucket": "{week}"},
            "requests[0].as_of_bucket",
            "undefined placeholder {week}",
        ),
        (
            {"requests__0__cache_tag": "{lang}"},
            "requests[0].cache_tag",
            "undefined placeholder {lang}",
        ),
        (
            {"requests__0__body": {"q": "{query}"}},
            "requests[0].body.q",
            "undefined placeholder {query}",
        ),
        (
            {"requests__0__endpoint": "/bars/{symbol!r}"},
            "requests[0].endpoint",
            "only a format spec",
        ),
        ({"requests__0__endpoint": "/bars/{symbol"}, "requests[0].endpoint", "literal braces"),
        (
            {"requests__0__endpoint": "/bars/{symbol:%Y}"},
            "requests[0].endpoint",
            "does not fit the value 'CSPX.L'",
        ),
        ({"requests__0__endpoint": "/bars"}, "requests[0].expand.symbol", "never used"),
        ({"requests__0__expand__today": ["x"]}, "requests[0].expand.today", "built-in placeholder"),
        (
            {"requests__0__method": "G T"},
            "requests[0]",
            "its first request is invalid: method must be",
        ),
        ({"sources__prices__adapter": "htp"}, "sources.prices.adapter", "unknown adapter 'htp'"),
        (
            {"sources__prices__adapter": "no_such_pkg.mod:factory"},
            "sources.prices.adapter",
            "cannot import 'no_such_pkg.mod'",
        ),
        (
            {"sources__prices__base_url": "ftp://x"},
            "sources.prices",
            "base_url must start with http",
        ),
        ({"job": "bad name!"}, "job", "job names are letters"),
    ],
)
def test_each_problem_names_its_key(
    tmp_path: Path, changes: dict[str, Any], key: str, problem: str
) -> None:
    err = error_of(tmp_path, edited(**changes))
    assert (err.key, problem in err.problem) == (key, True), str(err)
    assert f": {key}: " in str(err) or str(err).count("\n") > 0


def test_missing_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRICES_TOKEN")
    err = error_of(tmp_path, bars_job(URL))
    assert err.key == "sources.prices.headers.Authorization"
    assert "environment variable PRICES_TOKEN is not set" in err.problem


def test_environment_interpolation_defaults_and_escapes(tmp_path: Path) -> None:
    data = bars_job(URL)
    data["sources"]["prices"]["headers"] = {
        "Authorization": "Bearer ${PRICES_TOKEN}",
        "X-Plain": "$${NOT_ENV} and ${UNSET_VAR_FOR_TEST:-fallback} and $HOME",
    }
    config = load_job(write_job(tmp_path / "job.yaml", data))
    headers = config.sources["prices"].headers  # type: ignore[union-attr]
    assert headers["Authorization"] == "Bearer s3cr3t-token"
    assert headers["X-Plain"] == "${NOT_ENV} and fallback and $HOME"
    env_only = job_from_data(bars_job(URL), env={"PRICES_TOKEN": "other"})
    assert env_only.sources["prices"].headers["Authorization"] == "Bearer other"  # type: ignore[union-attr]
    data["sources"]["prices"]["headers"] = {"X": "${1BAD}"}
    assert "invalid ${1BAD}" in error_of(tmp_path, data).problem


def test_several_problems_in_one_message(tmp_path: Path) -> None:
    err = error_of(tmp_path, edited(concurrency=0, sources__prices__foo=1))
    assert [k for k, _ in err.problems] == ["sources.prices.foo", "concurrency"]
    assert str(err).splitlines()[0].endswith("2 problems:")


def test_yaml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    err = error_of(tmp_path, "job: x\nsources:\n  prices: {adapter: http\nrequests: []\n")
    assert err.line is not None and err.column is not None
    assert re.match(rf"{re.escape(str(tmp_path / 'job.yaml'))}:\d+:\d+: invalid YAML", str(err))
    dup = error_of(tmp_path, "job: x\njob: y\n")
    assert (dup.line, dup.column) == (2, 1) and "duplicate key 'job'" in str(dup)
    assert "a job file is a mapping" in str(error_of(tmp_path, "- a\n- b\n"))
    assert str(error_of(tmp_path, "")).endswith(
        "a job file is a mapping (job:, sources:, ...), not empty"
    )
    with pytest.raises(JobConfigError, match="cannot read the job file"):
        load_job(tmp_path / "missing.yaml")
    with pytest.raises(JobConfigError, match="<string>:1:"):
        parse_job("job: [")


def test_plugin_factories_are_checked_without_being_called(tmp_path: Path) -> None:
    data = bars_job(URL)
    data["sources"]["mock"] = {"adapter": "tests.jobs._factories:echo", "prefixx": "a"}
    data["requests"].append({"source": "mock", "kind": "k"})
    err = error_of(tmp_path, data)
    assert err.key == "sources.mock" and "does not accept these keys (prefixx)" in err.problem
    data["sources"]["mock"] = {"adapter": "tests.jobs._factories:nothing"}
    assert "has no 'nothing'" in error_of(tmp_path, data).problem
    data["sources"]["mock"] = {"adapter": "tests.jobs._factories.CALLS"}
    assert "not callable" in error_of(tmp_path, data).problem


def test_file_source_root_must_exist(tmp_path: Path) -> None:
    data = bars_job(URL)
    data["sources"]["files"] = {"adapter": "file", "root": "inbox"}
    data["requests"].append({"source": "files", "kind": "f", "endpoint": "a.csv"})
    err = error_of(tmp_path, data)
    assert err.key == "sources.files.root" and "is not a directory" in err.problem
    (tmp_path / "inbox").mkdir()
    assert load_job(tmp_path / "job.yaml").resolve("inbox") == tmp_path / "inbox"


def test_only_must_name_a_source(tmp_path: Path) -> None:
    config = load_job(write_job(tmp_path / "job.yaml", bars_job(URL)))
    with pytest.raises(JobConfigError, match="--only nope: not a source of this job"):
        JobPlan(config, only=["nope"])


def test_cli_refuses_an_invalid_job_and_calls_nothing(
    job_server: JobServer, tmp_path: Path
) -> None:
    data = bars_job(job_server.url)
    data["requests"][0]["expand"]["dates"]["chunk"] = "0d"
    path = write_job(tmp_path / "job.yaml", data)
    done = cli("run", str(path))
    assert done.returncode == 2
    assert f"invalid job: {path}: requests[0].expand.dates.chunk: chunk must be positive" in (
        " ".join(done.stderr.split())
    )
    assert job_server.total == 0 and not (tmp_path / "dataio").exists()


def _readme_job() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Jobs") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start : section.index("\n```", start)]


def test_the_readme_example_is_a_valid_job(tmp_path: Path) -> None:
    config = parse_job(_readme_job(), file="README.md", base_dir=tmp_path)
    plan = JobPlan(config)
    assert config.job == "prices_daily"
    assert plan.total == 3 * 13  # three symbols x 13 chunks of 30 days in 2024
    assert copy.deepcopy(yaml.safe_load(_readme_job()))["concurrency"] == config.concurrency


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Regression: problems came in stages: unknown keys and bad chunks first, undefined
    placeholders, unknown sources and dates out of order only once those were fixed."""
    data = bars_job(URL)
    entry = data["requests"][0]
    entry["endpointt"] = "/typo"  # unknown key
    entry["expand"]["dates"]["chunk"] = "1M"  # ambiguous unit
    entry["endpoint"] = "/bars/{symbol}/{sym}"  # undefined placeholder
    entry["ttl"] = "1m"  # ambiguous unit
    data["requests"].append(
        {
            "source": "pricez",  # unknown source
            "kind": "bars",
            "endpoint": "/x/{n}",
            "expand": {
                "n": [1, {"bad": 1}],  # a value that is not a scalar
                "dates": {"start": "2024-02-01", "end": "2024-01-01", "chunk": "1mo"},
            },
            "params": {"q": "{start}{missing}"},
        }
    )
    data["requests"].append({"kind": "no source"})  # missing key: the entry is left out
    data["sources"]["prices"]["retry"]["max_attempts"] = 0  # out of range
    data["sources"]["prices"]["base_url"] = "ftp://x"  # wrong meaning, beside the range error
    data["concurrency"] = 0
    err = error_of(tmp_path, data)
    problems = {(key, problem.split(";")[0].split(":")[0]) for key, problem in err.problems}
    assert problems == {
        ("sources.prices.retry.max_attempts", "Input should be greater than or equal to 1, got 0"),
        ("requests[0].endpointt", "unknown key 'endpointt'"),
        ("requests[0].expand.dates.chunk", "invalid chunk '1M'"),
        ("requests[0].ttl", "invalid duration '1m'"),
        ("requests[0].endpoint", "undefined placeholder {sym}"),
        (
            "requests[1].expand.n[1]",
            "expansion values are strings, numbers, booleans or dates, not a mapping",
        ),
        ("requests[1].source", "unknown source 'pricez'"),
        ("requests[1].expand.dates.end", "end 2024-01-01 is before start 2024-02-01"),
        ("requests[1].params.q", "undefined placeholder {missing}"),
        ("requests[2]", "missing required key 'source'"),
        ("sources.prices", "base_url must start with http"),
        ("concurrency", "Input should be greater than or equal to 1, got 0"),
    }, str(err)
    assert str(err).splitlines()[0].endswith(f"{len(err.problems)} problems:")


def test_a_missing_environment_variable_is_reported_once_beside_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRICES_TOKEN")
    data = bars_job(URL)
    data["requests"][0]["endpoint"] = "/bars/{symbol}/${SYMBOL_PATH}"
    data["concurrency"] = "${CONCURRENCY}"
    err = error_of(tmp_path, data)
    assert [k for k, _ in err.problems] == [
        "sources.prices.headers.Authorization",
        "requests[0].endpoint",
        "concurrency",
    ], str(err)  # not also "{SYMBOL_PATH} undefined" or "concurrency is not an integer"
    assert all("environment variable" in p for _, p in err.problems)


def test_a_repair_adds_no_problem_of_its_own(tmp_path: Path) -> None:
    """The meaning is checked on a repaired copy; what the repair changed is not reported again
    (the expansions are not "never used" because the bad params were left out)."""
    data = bars_job(URL)
    data["requests"][0]["params"] = "start={start}"  # not a mapping
    data["requests"][0]["endpoint"] = "/bars/{symbol}/{oops}"
    data["requests"][0]["expand"]["dates"]["start"] = "someday"  # a stand-in range is used
    data["requests"].append({"kind": "k", "source": "prices", "method": ["GET"]})
    err = error_of(tmp_path, data)
    assert [k for k, _ in err.problems] == [
        "requests[0].params",
        "requests[0].expand.dates.start",
        "requests[1].method",
        "requests[0].endpoint",
    ], str(err)
    assert "(left out)" not in str(err) and "2000-01-01" not in str(err)
