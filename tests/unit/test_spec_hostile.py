"""Hostile spec files: each is a `file:line: field: message` problem, fast and in bounded memory.

Before the loader's limits, `featureplane validate` spent 3 GB and raised MemoryError on
the alias bomb, and raised RecursionError or UnicodeDecodeError with a traceback on
deep nesting, a recursive alias, a deep type and a Latin-1 file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featureplane.errors import SpecError
from featureplane.spec import load_catalog

GROUP = "feature_groups:\n  - name: g\n    entity: u\n    kind: latest\n"


def _bomb() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"  # 9^9 = 387M strings once expanded


def _type(t: str) -> str:
    return GROUP + f'    features:\n      - name: f\n        type: "{t}"\n'


# name -> (content, line, field, message pattern)
CASES: dict[str, tuple[bytes | str, int, str, str]] = {
    "alias_bomb": (_bomb(), 5, "-", r"more than 50,000 YAML nodes \(aliases counted expanded\)"),
    "alias_bomb_in_a_group": (
        GROUP
        + "    tags: &t0 [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"    t{i}: &t{i} [{', '.join([f'*t{i - 1}'] * 9)}]\n" for i in range(1, 9)),
        9,
        "-",
        r"more than 50,000 YAML nodes",
    ),
    "recursive_alias": (
        "feature_groups: &a\n  - *a\n",
        2,
        "-",
        r"alias \*a is inside its own node",
    ),
    "deep_flow_list": (  # libyaml's own limit (1,000) answers first
        "feature_groups: " + "[" * 5000 + "]" * 5000 + "\n",
        1,
        "-",
        r"not valid YAML: while increasing flow level \(line 1\): exceeded maximum nesting depth",
    ),
    "deep_flow_map": (
        "x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        1,
        "-",
        r"nested more than 32 levels deep",
    ),
    "deep_block_list": ("x:\n  " + "- " * 5000 + "1\n", 2, "-", r"nested more than 32 levels deep"),
    "deep_type": (
        _type("list<" * 5000 + "string" + ">" * 5000),
        7,
        r"feature_groups[0].features[0].type",
        "type is longer than 256 characters",
    ),
    "deep_short_type": (
        _type("list<" * 40 + "int" + ">" * 40),
        7,
        r"feature_groups[0].features[0].type",
        "type is nested more than 32 levels deep",
    ),
    "latin1": (
        (GROUP + "    owner: caf\xe9\n").encode("latin-1"),
        5,
        "-",
        r"not UTF-8 text \(byte 0xe9\)",
    ),
    "utf16": ("feature_groups: []\n".encode("utf-16"), 1, "-", r"not UTF-8 text"),
    "python_tag": (
        "feature_groups: !!python/object/apply:os.system ['echo pwned']\n",
        1,
        "-",
        r"not valid YAML: could not determine a constructor for the tag",
    ),
    "duplicate_key": (
        GROUP + "    kind: timeseries\n",
        5,
        "feature_groups[0].kind",
        r"duplicate key \(first at line 4\)",
    ),
    "control_character": (
        GROUP + "    entity: a\x07b\n",
        5,
        "-",
        r"not valid YAML: unacceptable character #x0007: control characters are not allowed",
    ),
    "bad_date": ("x: 2024-13-45\n", 1, "-", r"not a valid timestamp: month must be in 1\.\.12"),
    "huge_int": ("x: " + "9" * 5000 + "\n", 1, "-", r"not a valid int: Exceeds the limit"),
    "bad_bool_tag": ("x:\n  - !!bool maybe\n", 2, "-", r"not a valid bool$"),
    "bad_timestamp_tag": ("x: !!timestamp soon\n", 1, "-", r"not a valid timestamp$"),
    "duplicate_key_in_flow": (
        "x: {a: 1, a: 2}\n",
        1,
        "x.a",
        r"duplicate key \(first at line 1\)",
    ),
    "two_documents": (
        "a: 1\n---\nb: 2\n",
        2,
        "-",
        r"not valid YAML: expected a single document in the stream \(line 1\): but found another",
    ),
    "undefined_alias": ("x: *nope\n", 1, "-", r"not valid YAML: found undefined alias 'nope'"),
    "list_as_name": (
        "feature_groups:\n  - name: [a]\n    entity: u\n    kind: latest\n"
        "    features: [{name: [f], type: string}, {name: [f], type: int}]\n",
        2,
        r"feature_groups[0].name",
        r"Input should be a valid string",
    ),
    "long_key": (
        GROUP + "    features: [{name: f, type: string}]\n    ? " + "k" * 100_000 + "\n    : 1\n",
        6,
        r"feature_groups[0].'kkkkkkk",
        r"unknown field",
    ),
    # Heavy ones: each refused by a budget, after reading some MiB or 50k nodes.
    "too_large": ("# " + "x" * (5 << 20) + "\n", 1, "-", r"larger than 4 MiB"),
    "huge_string": (
        GROUP.replace("name: g", "name: " + "g" * (3 << 20))
        + "    features: [{name: f, type: int}]\n",
        2,
        r"feature_groups[0].name",
        r"String should match pattern",
    ),
    "million_items": (
        "x: [" + ",".join(["1"] * 1_000_000) + "]\n",
        1,
        "-",
        r"more than 50,000 YAML nodes",
    ),
    "many_groups": (
        "feature_groups:\n"
        + "".join(
            f"  - {{name: g{i}, entity: u, kind: latest, features: [{{name: f, type: int}}]}}\n"
            for i in range(10_000)
        ),
        3573,
        "-",
        r"more than 50,000 YAML nodes",
    ),
}
HEAVY = ("too_large", "huge_string", "million_items", "many_groups")
ROOT = Path(__file__).resolve().parents[2]
FEATUREPLANE = str(Path(sys.executable).with_name("featureplane"))


def _write(folder: Path, name: str) -> Path:
    content = CASES[name][0]
    path = folder / f"{name}.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def _expected(path: Path, name: str) -> re.Pattern[str]:
    _, line, field, message = CASES[name]
    return re.compile(rf"^{re.escape(str(path))}:{line}: {re.escape(field)}\S*: {message}", re.M)


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_catalog_gives_a_located_problem(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    started = time.process_time()  # CPU time: the machine is shared
    with pytest.raises(SpecError) as caught:
        load_catalog(path)
    elapsed = time.process_time() - started
    text = str(caught.value)
    assert _expected(path, name).search(text), text[:500]
    assert all(len(str(p)) < 400 for p in caught.value.problems)  # no echo of the input
    assert elapsed < 2, f"{name}: {elapsed:.2f} s"


# Runs one command and reports its own CPU time and peak RSS. A wrapper, because a child
# forked from pytest starts with pytest's peak RSS (Linux carries it across exec).
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}")
sys.exit(code)
"""


def _validate(path: Path, tmp_path: Path) -> tuple[int, str, str, float, float]:
    """Run `featureplane validate PATH`: exit code, stdout, stderr, CPU seconds, peak RSS MB."""
    usage = tmp_path / "usage.txt"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(usage), FEATUREPLANE, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    cpu, rss_kb = usage.read_text().split()
    return proc.returncode, proc.stdout, proc.stderr, float(cpu), int(rss_kb) / 1024


def _check_validate(path: Path, tmp_path: Path, names: list[str]) -> None:
    code, out, err, cpu, rss = _validate(path, tmp_path)
    print(f"validate {path.name}: exit {code}, {cpu:.2f} s CPU, {rss:.0f} MB peak RSS")
    assert code == 1 and "Traceback" not in out + err, err[-2000:]
    for name in names:
        assert _expected(path / f"{name}.yaml" if path.is_dir() else path, name).search(out), name
    # CPU time, not wall time, as the machine is shared; 0.4 s of it is start-up.
    assert cpu < 2 and rss < 200


def test_validate_prints_every_light_case_fast_in_bounded_memory(tmp_path: Path) -> None:
    light = [n for n in CASES if n not in HEAVY]
    folder = tmp_path / "specs"
    folder.mkdir()
    for name in light:
        _write(folder, name)
    _check_validate(folder, tmp_path, light)


@pytest.mark.parametrize("name", HEAVY)
def test_validate_refuses_a_heavy_case_fast_in_bounded_memory(tmp_path: Path, name: str) -> None:
    _check_validate(_write(tmp_path, name), tmp_path, [name])


def test_odd_files_in_a_spec_folder(tmp_path: Path) -> None:
    folder = tmp_path / "specs"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.yaml").write_text("feature_groups: []\n")
    (folder / "a_folder.yaml").mkdir()  # a folder named like a spec: not a file to read
    (folder / "dangling.yaml").symlink_to(folder / "nowhere.yaml")
    (folder / "loop1.yaml").symlink_to(folder / "loop2.yaml")
    (folder / "loop2.yaml").symlink_to(folder / "loop1.yaml")
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop: not followed
    os.mkfifo(folder / "fifo.yaml")  # reading it would wait forever
    (folder / ".#ok.yaml").write_text("not: [a spec")  # an editor's lock file: hidden, skipped
    (folder / ".git").mkdir()
    (folder / ".git" / "x.yaml").write_text("not: [a spec")
    started = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_catalog(folder)
    assert time.perf_counter() - started < 2
    assert [str(p) for p in caught.value.problems] == [
        f"{folder / 'dangling.yaml'}:1: -: cannot read: No such file or directory",
        f"{folder / 'fifo.yaml'}:1: -: not a regular file",
        f"{folder / 'loop1.yaml'}:1: -: cannot read: Too many levels of symbolic links",
        f"{folder / 'loop2.yaml'}:1: -: cannot read: Too many levels of symbolic links",
    ]
    with pytest.raises(SpecError, match="not a regular file"):
        load_catalog("/dev/zero")  # endless: never read


def test_anchors_and_aliases_within_budget_still_work(tmp_path: Path) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(
        "feature_groups:\n"
        "  - name: a\n    entity: u\n    kind: latest\n"
        "    features: &f [{name: x, type: string}, {name: y, type: int}]\n"
        "    ttl: &ttl {soft: 10s, hard: 1m}\n"
        + "".join(
            f"  - {{name: g{i}, entity: u, kind: latest, features: *f, ttl: *ttl}}\n"
            for i in range(200)
        )
    )
    catalog = load_catalog(spec)
    assert len(catalog.groups) == 201
    assert catalog.group("g199").ttl.hard == 60_000


YAMLISH = st.lists(
    st.sampled_from([*"ab1:-[]{}&*!?,'\"|>#%@` \n\t.~<", "!!", "!!int ", "!!bool ", "\n  "]),
    max_size=80,
).map("".join)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.one_of(st.binary(max_size=300), YAMLISH, st.text(max_size=300)))
def test_any_content_is_a_catalog_or_spec_problems(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "fuzz.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    try:
        load_catalog(path)
    except SpecError as exc:
        assert all(p.file == str(path) and p.line >= 1 for p in exc.problems)


_ODD = st.one_of(st.none(), st.integers(-1, 3), st.lists(st.just("x"), max_size=2))
_NAMES = st.sampled_from(["g", "h", "a", "b", "bad name", ""]) | _ODD
_FEATURE = st.fixed_dictionaries(
    {}, optional={"name": _NAMES, "nme": _NAMES, "type": st.sampled_from(["int", "strin"])}
)
_GROUP = st.fixed_dictionaries(
    {},
    optional={
        "name": _NAMES,
        "nme": _NAMES,
        "entity": st.just("u"),
        "kind": st.sampled_from(["latest", "timeseries", "timeserie"]),
        "features": st.lists(_FEATURE, max_size=3) | _ODD,
        "featurs": st.lists(_FEATURE, max_size=2),
        "on_demand": st.sampled_from(["m:f", "bad"]),
        "ttl": st.fixed_dictionaries({}, optional={"soft": st.just("1s"), "sfot": st.just(1)}),
    },
)
_RULE = st.fixed_dictionaries(
    {},
    optional={
        "name": _NAMES,
        "topic": st.just("t"),
        "event_type": st.just("e"),
        "evnt_type": st.just("e"),
        "group": _NAMES,
        "grop": _NAMES,
        "id": st.just("uid"),
        "features": st.dictionaries(_NAMES.filter(lambda n: isinstance(n, str)), st.just("p"))
        | _ODD,
    },
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(groups=st.lists(_GROUP | _ODD, max_size=4), rules=st.lists(_RULE, max_size=4))
def test_any_spec_shaped_document_is_a_catalog_or_located_problems(
    tmp_path: Path, groups: list[object], rules: list[object]
) -> None:
    """Entries that half parse, in any mix, are checked against each other without an error
    of the loader's own, and no problem is said twice."""
    path = tmp_path / "shaped.yaml"
    path.write_text(yaml.safe_dump({"feature_groups": groups, "ingestion": rules}))
    try:
        load_catalog(path)
    except SpecError as exc:
        lines = [str(p) for p in exc.problems]
        assert lines and len(set(lines)) == len(lines), lines  # each problem said once
        assert all(p.file == str(path) and p.line >= 1 for p in exc.problems)
