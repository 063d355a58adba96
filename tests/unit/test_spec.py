"""The spec model and `featureplane validate`: good catalogs load, bad ones name file:line: field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from featureplane.cli import main
from featureplane.codec import encode
from featureplane.errors import SpecError
from featureplane.spec import SpecNotFoundError, load_catalog, parse_duration
from featureplane.types import parse_type

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BAD = """\
feature_groups:
  - name: clicks
    entity: user
    kind: timeseries
    features:
      - {name: a, type: strin}
      - {name: a, type: int}
    max_items: 0
    ttl: {soft: 10m, hard: 1m}
    retention: 30 days
  - name: ok_group
    entity: user
    kind: latest
    features:
      - {name: x, type: "set<list<int>>"}
    colour: red
ingestion:
  - name: r1
    topic: t
    event_type: click
    group: nope
    id: user_id
    features: {a: a}
  - name: r2
    topic: t
    event_type: click
    group: clicks
    id: user_id
    features: {zz: a}
"""


def test_examples_load() -> None:
    catalog = load_catalog(EXAMPLES)
    assert "recent_user_clicked_fleaMarketArticles" in catalog.groups
    assert catalog.topics == ("article-updates", "user-actions", "user-updates")
    group = catalog.group("article_embeddings")
    assert str(group.features[0].type) == "vector<float,64>"
    defaults = catalog.group("article_stats")
    assert defaults.max_items == 50 and defaults.tiers == ("local", "redis", "store")
    assert (defaults.ttl.soft, defaults.ttl.hard, defaults.ttl.jitter) == (30_000, 300_000, 0.1)
    assert defaults.write == "through" and defaults.retention is None


def test_every_problem_is_located(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD)
    with pytest.raises(SpecError) as err:
        load_catalog(spec)
    lines = [str(p) for p in err.value.problems]
    f = str(spec)
    assert f"{f}:6: feature_groups[0].features[0].type: unknown type 'strin'" in lines[0]
    expected = [
        f"{f}:7: feature_groups[0].features[1].name: duplicate feature name 'a'",
        f"{f}:8: feature_groups[0].max_items:",
        f"{f}:9: feature_groups[0].ttl: soft (600000 ms) must not exceed hard (60000 ms)",
        f"{f}:10: feature_groups[0].retention: bad duration '30 days'",
        f"{f}:15: feature_groups[1].features[0].type: set elements must be a scalar type",
        f"{f}:16: feature_groups[1].colour: unknown field",
        f"{f}:21: ingestion[0].group: unknown group 'nope'",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    # A duplicate feature is said once, at the repeat, even beside the group's other problems.
    assert sum("duplicate feature" in line for line in lines) == 1, lines
    # r2 points at a group that failed to parse: its features are still known, so r2's own
    # mistake is found now, and the group is not called unknown.
    rule_problems = [line for line in lines if "ingestion[1]" in line]
    assert rule_problems == [
        f"{f}:29: ingestion[1].features.zz: group 'clicks' has no feature 'zz'"
    ]


def test_rule_feature_must_exist(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text(
        "feature_groups:\n  - {name: g, entity: u, kind: latest, features: [{name: a, type: int}]}\n"
    )
    (tmp_path / "r.yaml").write_text(
        "ingestion:\n  - name: r\n    topic: t\n    event_type: e\n    group: g\n"
        "    id: uid\n    features:\n      zz: a\n"
    )
    with pytest.raises(SpecError) as err:
        load_catalog(tmp_path)
    assert [str(p) for p in err.value.problems] == [
        f"{tmp_path / 'r.yaml'}:8: ingestion[0].features.zz: group 'g' has no feature 'zz'"
    ]


def test_duplicate_groups_across_files(tmp_path: Path) -> None:
    group = "feature_groups:\n  - {name: g, entity: u, kind: latest, features: [{name: a, type: int}]}\n"
    (tmp_path / "a.yaml").write_text(group)
    (tmp_path / "b.yaml").write_text(group)
    with pytest.raises(SpecError, match=r"b.yaml:2: feature_groups\[0\].name: duplicate group 'g'"):
        load_catalog(tmp_path)


ONE_PASS = """\
feature_groups:
  - name: clicks
    entity: user
    kind: timeseries
    kind: latest
    max_item: 10
    features:
      - {name: a, type: string}
      - {nme: b, type: int}
      - {name: a, type: int}
    ttl: {sfot: 1s}
  - name: clicks
    entity: user
    kind: latest
    features: [{name: x, type: int}]
  - nme: stats
    entity: article
    kind: latest
    features: [{name: v, type: int}]
ingestion:
  - name: r1
    topic: t
    event_type: click
    group: clicks
    id: user_id
    features: {a: a, zz: z}
  - name: r1
    topic: t
    evnt_type: click
    group: stats
    id: user_id
    features: {v: v, w: w}
  - name: r3
    topic: t
    event_type: click
    group: clcks
    id: user_id
    features: {a: a}
fetaure_groups: []
"""


def test_every_problem_of_a_file_in_one_pass(tmp_path: Path) -> None:
    """A duplicate key, a failed group and a failed rule no longer hide the problems of the
    others; a misspelled key is suggested its field and not also called missing."""
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE_PASS)
    with pytest.raises(SpecError) as err:
        load_catalog(spec)
    f = str(spec)
    assert [str(p) for p in err.value.problems] == [
        f"{f}:5: feature_groups[0].kind: duplicate key (first at line 4)",
        f"{f}:6: feature_groups[0].max_item: unknown field (did you mean 'max_items'?)",
        f"{f}:9: feature_groups[0].features[1].nme: unknown field (did you mean 'name'?)",
        f"{f}:10: feature_groups[0].features[2].name: duplicate feature name 'a'",
        f"{f}:11: feature_groups[0].ttl.sfot: unknown field (did you mean 'soft'?)",
        f"{f}:12: feature_groups[1].name: duplicate group 'clicks' (first at {f}:2)",
        f"{f}:16: feature_groups[2].nme: unknown field (did you mean 'name'?)",
        f"{f}:26: ingestion[0].features.zz: group 'clicks' has no feature 'zz'",
        f"{f}:27: ingestion[1].name: duplicate rule 'r1' (first at {f}:21)",
        f"{f}:29: ingestion[1].evnt_type: unknown field (did you mean 'event_type'?)",
        f"{f}:32: ingestion[1].features.w: group 'stats' has no feature 'w'",
        f"{f}:36: ingestion[2].group: unknown group 'clcks' (did you mean 'clicks'?)",
        f"{f}:39: fetaure_groups: unknown section (did you mean 'feature_groups'?)",
    ]


def test_two_files_pasted_into_one_are_checked_whole(tmp_path: Path) -> None:
    """Sections given twice (files pasted together) are read as one list each: the duplicate
    group and the rule's unknown feature are found in the same pass as the duplicate keys,
    where they used to appear only once the file was split again."""
    half = (
        "feature_groups:\n  - {{name: clicks, entity: user, kind: latest, "
        "features: [{{name: {f}, type: int}}]}}\n"
        "ingestion:\n  - {{name: r{f}, topic: t, event_type: e, group: clicks, id: uid, "
        "features: {{{f}: {f}}}}}\n"
    )
    spec = tmp_path / "pasted.yaml"
    spec.write_text(half.format(f="a") + half.format(f="b"))
    with pytest.raises(SpecError) as err:
        load_catalog(spec)
    f, merged = str(spec), "its items are checked as if they followed the first's"
    assert [str(p) for p in err.value.problems] == [
        f"{f}:5: feature_groups: duplicate key (first at line 1); {merged}",
        f"{f}:6: feature_groups[1].name: duplicate group 'clicks' (first at {f}:2)",
        f"{f}:7: ingestion: duplicate key (first at line 3); {merged}",
        f"{f}:8: ingestion[1].features.b: group 'clicks' has no feature 'b'",
    ]


def test_unknown_keys_without_a_close_field_name_the_choices_or_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "metadata: {}\nfeature_groups:\n"
        "  - {name: g, entity: u, kind: latest, colour: red, features: [{name: a, type: int}]}\n"
    )
    with pytest.raises(SpecError) as err:
        load_catalog(spec)
    assert [str(p) for p in err.value.problems] == [
        f"{spec}:1: metadata: unknown section (expected one of feature_groups, ingestion, batch_jobs)",
        f"{spec}:3: feature_groups[0].colour: unknown field",
    ]


def test_a_missing_spec_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecNotFoundError) as err:
        load_catalog("featureplane.yaml")
    text = str(err.value)
    assert text.startswith(
        f"no spec at featureplane.yaml ({tmp_path / 'featureplane.yaml'}): no such file or folder."
    )
    for hint in (
        "--spec",
        "FEATUREPLANE_SPEC",
        "featureplane validate PATH",
        "featureplane up --demo",
    ):
        assert hint in text
    assert ":0:" not in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecNotFoundError, match=r"^no spec at .*empty: a folder with no \.yaml"):
        load_catalog(tmp_path / "empty")


def test_a_configmap_volume_is_read_once(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as files in a hidden `..<timestamp>` folder, `..data`
    pointing at it, and one symlink a key beside them: each spec file is read once."""
    mount = tmp_path / "spec"
    data = mount / "..2026_11_30_12_00_00.000000001"
    data.mkdir(parents=True)
    (mount / "..data").symlink_to(data.name)
    for f in sorted(EXAMPLES.glob("*.yaml")):
        (data / f.name).write_text(f.read_text())
        (mount / f.name).symlink_to(f"..data/{f.name}")
    assert load_catalog(mount).groups.keys() == load_catalog(EXAMPLES).groups.keys()


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("feature_groups:\n  - name: x\n    kind: [\n")
    with pytest.raises(SpecError, match=r"x.yaml:4: -: not valid YAML"):
        load_catalog(tmp_path / "x.yaml")


@pytest.mark.parametrize(
    ("text", "ms"),
    [("500ms", 500), ("30s", 30_000), ("5m", 300_000), ("2h", 7_200_000), ("30d", 2_592_000_000)],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["30", "1w", "-5s", "5 m", 30, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    "text",
    [
        "string",
        "int",
        "float",
        "bool",
        "bytes",
        "list<string>",
        "set<int>",
        "map<string,int>",
        "vector<float,64>",
        "map<string,list<float>>",
        "list<map<string,bytes>>",
    ],
)
def test_types_parse_and_print(text: str) -> None:
    assert str(parse_type(text)) == text


@pytest.mark.parametrize(
    "bad",
    [
        "str",
        "set<list<int>>",
        "vector<float,0>",
        "map<int,int>",
        "list<>",
        "list<" * 32 + "int" + ">" * 32,  # 33 levels
        "list<" * 5000 + "int" + ">" * 5000,  # was a RecursionError
        "vector<float," + "9" * 5000 + ">",  # was int()'s 4,300-digit ValueError
    ],
)
def test_bad_types(bad: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_type(bad)
    assert len(str(caught.value)) < 200


def test_types_nest_up_to_32_levels() -> None:
    text = "list<" * 31 + "int" + ">" * 31
    assert str(parse_type(text)) == text


def test_vectors_of_one_group_must_fit_one_item_together(tmp_path: Path) -> None:
    def group(*dims: int) -> str:
        features = ", ".join(
            f"{{name: v{i}, type: 'vector<float,{d}>'}}" for i, d in enumerate(dims)
        )
        return f"feature_groups:\n  - name: g\n    entity: u\n    kind: latest\n    features: [{features}, {{name: n, type: int}}]\n"

    (tmp_path / "g.yaml").write_text(group(1024, 1017))  # 8,191 bytes: fits
    catalog = load_catalog(tmp_path)
    assert len(encode(catalog.group("g"), {"v0": [0.0] * 1024, "v1": [0.0] * 1017})) == 8191
    (tmp_path / "g.yaml").write_text(group(1024, 1018))
    with pytest.raises(SpecError) as err:
        load_catalog(tmp_path)
    assert [str(p) for p in err.value.problems] == [
        f"{tmp_path / 'g.yaml'}:5: feature_groups[0].features: an item with every vector set "
        "takes at least 8,195 bytes packed (4 a float), over the 8,192-byte item limit"
    ]


def test_groups_and_features_carry_description_owner_and_tags(tmp_path: Path) -> None:
    catalog = load_catalog(EXAMPLES)
    for group in catalog.groups.values():
        assert group.description and group.owner and group.tags, group.name
        assert all(f.description for f in group.features), group.name
    (tmp_path / "g.yaml").write_text(
        "feature_groups:\n"
        "  - name: g\n"
        "    entity: u\n"
        "    kind: latest\n"
        "    description: |\n      Two lines,\n      kept.\n"
        "    owner: ' team-a '\n"
        "    tags: [pii, 'ml:embeddings', a/b-c.d_e]\n"
        "    features: [{name: a, type: int, owner: bob@example.com, tags: [x]}]\n"
    )
    group = load_catalog(tmp_path).group("g")
    assert (group.description, group.owner, group.tags) == (
        "Two lines,\nkept.",
        "team-a",
        ("pii", "ml:embeddings", "a/b-c.d_e"),
    )
    feature = group.features[0]
    assert (feature.description, feature.owner, feature.tags) == (None, "bob@example.com", ("x",))
    assert group.model_dump(mode="json")["tags"] == ["pii", "ml:embeddings", "a/b-c.d_e"]


@pytest.mark.parametrize(
    ("yaml_field", "message"),
    [
        ("owner: ''", "owner: an owner must not be empty"),
        ('owner: "a\\nb"', "owner: an owner holds the control character"),
        ("description: 5", "description: a description must be a string, got 5"),
        ('description: "\\0"', "description: a description holds the control"),
        (
            "description: " + "x" * 2001,
            "description: a description is 2,001 characters",
        ),
        ("tags: pii", "tags: tags must be a list of strings, got 'pii'"),
        ("tags: [a, a]", "tags: tags must not repeat"),
        ("tags: ['-a']", "tags: bad tag '-a' (letters, digits"),
        ("tags: [[a]]", "tags: bad tag ['a']"),
        ("tags: [" + ", ".join(f"t{i}" for i in range(33)) + "]", "33 tags, more than 32"),
    ],
)
def test_bad_metadata_is_located(tmp_path: Path, yaml_field: str, message: str) -> None:
    (tmp_path / "g.yaml").write_text(
        "feature_groups:\n  - name: g\n    entity: u\n    kind: latest\n"
        f"    {yaml_field}\n"
        "    features: [{name: a, type: int}]\n"
    )
    with pytest.raises(SpecError) as err:
        load_catalog(tmp_path)
    [problem] = [str(p) for p in err.value.problems]
    assert problem.startswith(f"{tmp_path / 'g.yaml'}:5: feature_groups[0].")
    assert message in problem
    assert len(problem) < 400


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES)]) == 0
    assert "7 feature groups" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text(BAD)
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'bad.yaml'}:21: ingestion[0].group: unknown group 'nope'" in out


def test_every_command_has_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = ["up", "serve", "ingest", "retry", "backfill", "load", "validate", "demo-events"]
    for command in commands:
        assert command in out
        sub = subprocess.run(
            [sys.executable, "-m", "featureplane.cli", command, "--help"],
            capture_output=True,
            text=True,
        )
        assert sub.returncode == 0 and "usage: featureplane" in sub.stdout, sub.stderr
