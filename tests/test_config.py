import os
import re
from pathlib import Path

import pytest
import yaml

from llem import config
from llem.errors import ConfigError


def load_text(tmp_path, text, env=None):
    p = tmp_path / "llem.yaml"
    p.write_text(text)
    return config.load(p, env=env or {})


def test_defaults_without_any_file(tmp_path):
    c = config.load(env={"LLEM_CONFIG": ""})
    assert c.sampler.interval_s == 10.0 and c.state_dir == "/var/lib/llem"
    assert c.sensors == "auto"


DOCS = Path(__file__).resolve().parents[1] / "docs"
_PLACEHOLDER = re.compile(r"\b[A-Z]+_DIR\b")  # a default computed from another key


def _rows(text: str) -> dict[str, tuple[str, str]]:
    """``| `key` | default | meaning |`` rows of a Markdown page: key -> (default, meaning)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for key in re.findall(r"`([a-z_.*]+)`", cells[0]):
                out[key] = (cells[1], "|".join(cells[2:]))
    return out


def _yaml_keys(text: str) -> set[str]:
    """Dotted keys of the ``yaml`` examples of a Markdown page."""
    keys = set()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        for section, body in (yaml.safe_load(block) or {}).items():
            if isinstance(body, dict):
                keys |= {f"{section}.{k}" for k in body}
    return keys


def documented_keys() -> dict[str, str | None]:
    """Every key the docs describe -> its documented default (None where none is given).

    The user guide's table names each key or a whole section (``carbon.*``) with the page
    that describes it; there a key is a row of the section's table or a line of its YAML.
    """
    guide_text = (DOCS / "user-guide.md").read_text("utf-8")
    guide = _rows(guide_text[guide_text.index("\n## Configuration") :])
    out: dict[str, str | None] = {}
    for key, (default, meaning) in guide.items():
        if not key.endswith(".*"):
            out[key] = default
            continue
        section = key[:-2]
        for page in re.findall(r"`docs/([a-z-]+\.md)`", meaning):
            text = (DOCS / page).read_text("utf-8")
            heading = re.search(rf"^## .*`{section}:`.*$", text, re.M)
            if heading:  # the section's own table, if the page has one
                part = text[heading.end() :].split("\n## ", 1)[0]
                for field, (value, _) in _rows(part).items():
                    out[f"{section}.{field}"] = value
            for dotted in _yaml_keys(text):
                if dotted.startswith(section + "."):
                    out.setdefault(dotted, None)
    return out


def _same_default(documented: str, actual) -> bool:
    text = documented.strip("`")
    if actual is None:
        return text == "none" or bool(_PLACEHOLDER.search(text))
    return yaml.safe_load(text) == actual


def test_every_key_is_documented_with_its_default():
    docs = documented_keys()
    defaults = config.Config()
    for key in config.all_keys():
        assert key in docs, f"{key} is not in docs/user-guide.md nor the page it points to"
        actual = defaults
        for part in key.split("."):
            actual = getattr(actual, part)
        if docs[key]:
            assert _same_default(docs[key], actual), (key, docs[key], actual)
    assert set(docs) <= set(config.all_keys()), "the docs describe keys that do not exist"


def test_full_file(tmp_path):
    c = load_text(
        tmp_path,
        """
cluster: hpc1
state_dir: /srv/llem
sensors: [rapl, nvml]
sampler:
  interval_s: 0.5
carbon:
  region: DE
  pue: {2026-01: 1.4, 2026-02: 1.3}
embodied:
  enabled: true
""",
    )
    assert c.cluster == "hpc1" and c.sensors == ("rapl", "nvml")
    assert c.sampler.interval_s == 0.5 and c.carbon.pue == {"2026-01": 1.4, "2026-02": 1.3}
    assert c.embodied.enabled is True
    assert c.source.endswith("llem.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"malformed YAML at line 4, column 1: .*flow sequence that starts at line 3",
    ):
        load_text(tmp_path, "cluster: a\nsampler:\n  interval_s: [1, 2\n")


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'sampler.intervl_s'; did you mean 'sampler.interval_s'"
    ):
        load_text(tmp_path, "sampler:\n  intervl_s: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stat_dir'; did you mean 'state_dir'"):
        load_text(tmp_path, "stat_dir: /x\n")


@pytest.mark.parametrize(
    "text, match",
    [
        ("sampler:\n  interval_s: fast\n", "'sampler.interval_s' must be a number"),
        ("sampler:\n  interval_s: 0.01\n", "at least 0.1"),
        ("sampler: 5\n", "'sampler' must be a mapping"),
        ("embodied:\n  enabled: 'yes'\n", "must be true or false"),
        ("carbon:\n  pue: 0.8\n", "at least 1.0"),
        ("carbon:\n  pue: {January: 1.2}\n", "not YYYY-MM"),
        ("sensors: [rapl, nvm]\n", "did you mean 'nvml'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("sampler:\n  nice: 1.5\n", "must be an integer"),
        ("sampler:\n  interval_s: .nan\n", "finite"),
    ],
)
def test_wrong_types_and_ranges(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_text(tmp_path, text)


def test_empty_file_is_defaults(tmp_path):
    assert load_text(tmp_path, "").sampler.interval_s == 10.0


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(env={"LLEM_CONFIG": str(tmp_path / "nope.yaml")})


def test_binary_garbage_file(tmp_path):
    p = tmp_path / "llem.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        config.load(p, env={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = tmp_path / "llem.yaml"
    p.write_text("cluster: x\n")
    p.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        config.load(p, env={})


def test_env_overrides_win_over_the_file(tmp_path):
    c = load_text(
        tmp_path,
        "sampler:\n  interval_s: 5\n",
        env={
            "LLEM_SAMPLER_INTERVAL_S": "0.25",
            "LLEM_SENSORS": "rapl,estimate",
            "LLEM_CARBON_REGION": "FR",
            "LLEM_POWERCAP_ROOT": "/x",
        },
    )
    assert c.sampler.interval_s == 0.25 and c.sensors == ("rapl", "estimate")
    assert c.carbon.region == "FR"
    assert c.source.endswith("+ environment")


def test_bad_env_override_is_reported_as_such(tmp_path):
    with pytest.raises(ConfigError, match="environment: 'sampler.interval_s' must be a number"):
        config.load(env={"LLEM_SAMPLER_INTERVAL_S": "soon", "LLEM_CONFIG": "/dev/null"})
    with pytest.raises(ConfigError, match="did you mean LLEM_SAMPLER_INTERVAL_S"):
        config.load(env={"LLEM_SAMPLER_INTERVALS": "1", "LLEM_CONFIG": "/dev/null"})


def test_choice_keys(tmp_path):
    with pytest.raises(ConfigError, match="'aggregate.processed' must be one of archive, delete"):
        load_text(tmp_path, "aggregate:\n  processed: shred\n")
    assert load_text(tmp_path, "aggregate:\n  processed: delete\n").aggregate.processed == "delete"


def test_aggregate_readers_is_auto_or_a_count(tmp_path):
    assert config.load(env={"LLEM_CONFIG": "/dev/null"}).aggregate.readers == "auto"
    assert load_text(tmp_path, "aggregate:\n  readers: 3\n").aggregate.readers == 3
    assert load_text(tmp_path, "aggregate:\n  readers: 0\n").aggregate.readers == 0
    assert (
        config.load(
            env={"LLEM_CONFIG": "/dev/null", "LLEM_AGGREGATE_READERS": "2"}
        ).aggregate.readers
        == 2
    )
    for bad in ("-1", "many", "true", "1.5"):
        with pytest.raises(ConfigError, match="'aggregate.readers' must be 'auto' or a whole"):
            load_text(tmp_path, f"aggregate:\n  readers: {bad}\n")


def test_aggregate_batch_size_is_auto_or_a_count(tmp_path):
    assert config.load(env={"LLEM_CONFIG": "/dev/null"}).aggregate.batch_size == "auto"
    assert load_text(tmp_path, "aggregate:\n  batch_size: 1500\n").aggregate.batch_size == 1500
    for bad in ("0", "-1", "many", "true", "1.5"):
        with pytest.raises(ConfigError, match="'aggregate.batch_size' must be 'auto' or a whole"):
            load_text(tmp_path, f"aggregate:\n  batch_size: {bad}\n")
