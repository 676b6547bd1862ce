"""Config files: ``hybridfs config check`` accepts good files, rejects bad ones in one line naming the key, masks
secrets; ``${env:}``/``${cred:}`` references; flags override the file, in check and in a real mount."""

from __future__ import annotations

import os
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from helpers import run_hybridfs

from hybridfs.config import ConfigError, from_mapping, parse_size

BASE = """\
source = "s3://hybridfs/projects"
mountpoint = "{mnt}"
cache_dir = "{tmp}/cache"
kafka = "127.0.0.1:19092"
"""


def config_file(tmp_path: Path, body: str, *, base: bool = True, mode: int = 0o600, name: str = "m.toml") -> Path:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    text = (BASE.format(mnt=tmp_path / "mnt", tmp=tmp_path) if base else "") + textwrap.dedent(body)
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def check(path: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    return run_hybridfs("config", "check", str(path), *flags, env=env, check=False, timeout=60)


def effective(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# effective configuration of ")
    return tomllib.loads(result.stdout)["mount"]


def test_check_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    path = config_file(tmp_path, """\
        cache_size = "3G"
        file_mode = "0640"
        write_timeout = 20
        [kafka_options]
        security.protocol = "SASL_SSL"
        sasl.mechanism = "SCRAM-SHA-512"
        sasl.username = "svc"
        sasl.password = "${env:HYBRIDFS_TEST_KAFKA_PASSWORD}"
        "ssl.key.password" = "literal-key-secret"
        enable.ssl.certificate.verification = false
        """)
    result = check(path, env={"HYBRIDFS_TEST_KAFKA_PASSWORD": "env-secret-value"})
    cfg = effective(result)
    assert cfg["source"] == "s3://hybridfs/projects"
    assert parse_size(cfg["cache_size"]) == 3 * 1024**3
    assert cfg["file_mode"] == "0640" and cfg["write_timeout"] == 20.0
    assert cfg["part_size"] == "8M" and cfg["no_events"] is False  # defaults are shown too
    # TOML's dotted keys become librdkafka's names; booleans are spelled the way librdkafka reads them.
    assert cfg["kafka_options"]["security.protocol"] == "SASL_SSL"
    assert cfg["kafka_options"]["enable.ssl.certificate.verification"] == "false"
    assert cfg["kafka_options"]["sasl.username"] == "svc"
    # Secrets: a reference is shown as the reference, a literal is masked; neither value is printed.
    assert cfg["kafka_options"]["sasl.password"] == "${env:HYBRIDFS_TEST_KAFKA_PASSWORD}"
    assert cfg["kafka_options"]["ssl.key.password"] == "********"
    assert "env-secret-value" not in result.stdout + result.stderr
    assert "literal-key-secret" not in result.stdout + result.stderr
    assert result.stderr == ""  # mode 600: no warning about the literal secret

    # The output is itself a valid config file, and checking it again gives the same configuration.
    again = config_file(tmp_path, result.stdout, base=False, name="again.toml")
    assert effective(check(again, env={"HYBRIDFS_TEST_KAFKA_PASSWORD": "x"})) == cfg


@pytest.mark.parametrize(
    ("body", "key", "value", "why"),
    [
        ('cache_size = "ten gigs"', "cache_size", "'ten gigs'", "not a size"),
        ('part_size = "1M"', "part_size", "1048576", "between 5M and 5G"),
        ("high_watermark = 1.5", "high_watermark", "1.5", "must be in (0, 1]"),
        ("low_watermark = 0.95", "low_watermark", "0.95", "below high_watermark"),
        ("s3_threads = 0", "s3_threads", "0", "at least 1"),
        ('no_events = "maybe"', "no_events", "'maybe'", "expected true or false"),
        ('file_mode = "0999"', "file_mode", "'0999'", "expected int"),
        ('log_level = "LOUD"', "log_level", "'LOUD'", "must be DEBUG, INFO, WARNING or ERROR"),
        ('topic_prefix = "a b"', "topic_prefix", "'a b'", "only letters"),
        ('cache_sise = "1G"', "cache_sise", "'1G'", "unknown option (did you mean cache_size?)"),
        ('kafka_options = "sasl.password=x"', "kafka_options", "'sasl.password=x'", "expected a table"),
        ('[kafka_options]\n"sasl.password" = "${env:HYBRIDFS_TEST_UNSET}"', "kafka_options.sasl.password",
         "'${env:HYBRIDFS_TEST_UNSET}'", "environment variable HYBRIDFS_TEST_UNSET is not set"),
        ('[kafka_options]\n"sasl.password" = "${cred:kafka}"', "kafka_options.sasl.password",
         "'${cred:kafka}'", "$CREDENTIALS_DIRECTORY is not set"),
        ('[kafka_options]\n"ssl.ca.location" = ["a", "b"]', "kafka_options.ssl.ca.location", "['a', 'b']",
         "expected a string, number or boolean"),
    ],
)
def test_check_rejects_a_bad_value_in_one_line(tmp_path: Path, body: str, key: str, value: str,
                                                why: str) -> None:
    result = check(config_file(tmp_path, body + "\n"), env={"CREDENTIALS_DIRECTORY": ""})
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hybridfs: error: {key} = {value}: "), lines[0]
    assert why in lines[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('cache_dir = "/c"\n', r"^hybridfs: error: source = '': expected s3://BUCKET"),
        ('source = "s3://hybridfs"\nmountpoint = "/m"\n', r"^hybridfs: error: cache_dir: missing"),
        ('[mount]\nsource = "s3://hybridfs"\n[extra]\nx = 1\n',
         r"^hybridfs: error: extra = \{'x': 1\}: unknown top-level key \(options belong in the \[mount\] table\)$"),
        ("source = \n", r"^hybridfs: error: config .*m\.toml: not valid TOML: .*line 1"),
    ],
)
def test_check_rejects_a_bad_file_in_one_line(tmp_path: Path, body: str, message: str) -> None:
    result = check(config_file(tmp_path, body, base=False),
                   env={"CACHE_DIRECTORY": "", "HYBRIDFS_KAFKA_BOOTSTRAP": "x:1"})
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr.strip()), result.stderr


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.toml")
    assert result.returncode != 0
    assert result.stderr.strip() == f"hybridfs: error: cannot read config {tmp_path / 'nope.toml'}: " \
                                    "No such file or directory"


def test_flags_override_the_file_in_check(tmp_path: Path) -> None:
    path = config_file(tmp_path, """\
        cache_size = "1G"
        topic_prefix = "from-file"
        [kafka_options]
        "client.id" = "from-file"
        "socket.timeout.ms" = 5000
        """)
    cfg = effective(check(path, "--cache-size", "5G", "--kafka-option", "client.id=from-flag", "--no-events"))
    assert cfg["cache_size"] == "5G"
    assert cfg["topic_prefix"] == "from-file"
    assert cfg["no_events"] is True
    assert cfg["kafka_options"] == {"client.id": "from-flag", "socket.timeout.ms": "5000"}
    bad = check(path, "--cache-size", "lots")
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "hybridfs: error: cache_size = 'lots': not a size (examples: 4096, 512M, 10G)")


def test_flags_override_the_file_in_a_real_mount(mount_factory: Any, tmp_path: Path) -> None:
    """The file sets cache_size, cache_dir and dir_mode; the command line overrides the first two."""
    path = tmp_path / "over.toml"
    path.write_text('[mount]\ncache_size = "1G"\ncache_dir = "/nonexistent/ignored"\ndir_mode = "0750"\n')
    mount = mount_factory(extra_args=["--config", str(path), "--cache-size", "64M"])  # (and --cache-dir)
    mounted_line = next(line for line in mount.log_text().splitlines() if "hybridfs.daemon: mounted" in line)
    assert f"(cache {mount.cache_dir}, {64 * 1024**2} bytes;" in mounted_line, mounted_line
    assert os.stat(mount.path).st_mode & 0o777 == 0o750  # from the file: no flag given


def test_secrets_from_the_environment_and_systemd_credentials(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "kafka-password").write_text("from-credential\n")
    values = {
        "kafka": "${env:HYBRIDFS_TEST_BROKERS}",
        "kafka_options": {"sasl.password": "${cred:kafka-password}", "sasl.username": "u-${env:HYBRIDFS_TEST_U}"},
    }
    monkeypatch.setenv("HYBRIDFS_TEST_BROKERS", "b1:9093,b2:9093")
    monkeypatch.setenv("HYBRIDFS_TEST_U", "42")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = from_mapping(values)
    assert cfg.kafka == "b1:9093,b2:9093"
    assert cfg.kafka_options == {"sasl.password": "from-credential", "sasl.username": "u-42"}
    (creds / "kafka-password").unlink()
    with pytest.raises(ConfigError, match=r"^kafka_options\.sasl\.password = '\$\{cred:kafka-password\}': "
                                          r"cannot read credential .*kafka-password"):
        from_mapping(values)


def test_env_file_as_the_unit_reads_it(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[kafka_options]\n"sasl.password" = "${env:HYBRIDFS_TEST_PW}"\n')
    env_file = tmp_path / "m.env"
    env_file.write_text('# secrets for the unit\nHYBRIDFS_TEST_PW="p w"\n\n')
    assert check(path).returncode != 0
    cfg = effective(check(path, "--env-file", str(env_file)))
    assert cfg["kafka_options"]["sasl.password"] == "${env:HYBRIDFS_TEST_PW}"


def test_a_literal_secret_in_a_readable_file_is_a_warning(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[kafka_options]\n"sasl.password" = "hunter2"\n', mode=0o644)
    result = check(path)
    effective(result)
    assert "hunter2" not in result.stdout + result.stderr
    assert re.search(r"warning: kafka_options\.sasl\.password: a secret written in .*, which others may read",
                     result.stderr), result.stderr


def test_systemd_directories_are_the_defaults(tmp_path: Path) -> None:
    path = config_file(tmp_path, "", base=False)
    path.write_text(f'source = "s3://hybridfs/p"\nmountpoint = "{tmp_path}"\nno_events = true\n')
    env = {"CACHE_DIRECTORY": "/var/cache/hybridfs/p", "STATE_DIRECTORY": "/var/lib/hybridfs/p"}
    cfg = effective(check(path, env=env))
    assert cfg["cache_dir"] == "/var/cache/hybridfs/p" and cfg["state_dir"] == "/var/lib/hybridfs/p"
    # An explicit value wins over the unit's directories.
    cfg = effective(check(path, "--cache-dir", str(tmp_path / "c"), env=env))
    assert cfg["cache_dir"] == str(tmp_path / "c")


def test_config_get(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[kafka_options]\n"sasl.password" = "x"\n"client.id" = "c"\n')
    get = lambda key: run_hybridfs("config", "get", str(path), key, check=False)  # noqa: E731
    assert get("mountpoint").stdout == f"{tmp_path / 'mnt'}\n"
    assert get("cache-size").stdout == f"{10 * 1024**3}\n"
    assert get("kafka_options.client.id").stdout == "c\n"
    secret = get("kafka_options.sasl.password")
    assert secret.returncode != 0 and "x\n" not in secret.stdout
    assert secret.stderr.strip() == "hybridfs: error: kafka_options.sasl.password: holds secrets; not printed"
    whole = get("kafka_options")
    assert whole.returncode != 0 and "x" not in whole.stdout
    assert whole.stderr.strip() == "hybridfs: error: kafka_options: a table; ask for one entry, e.g. " \
                                   "kafka_options.sasl.password"
    assert get("nope").stderr.strip() == "hybridfs: error: nope: unknown option"


def test_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "systemd" / "example.toml"
    result = check(example, env={"KAFKA_PASSWORD": "p"})
    cfg = effective(result)
    assert cfg["kafka_options"]["sasl.password"] == "${env:KAFKA_PASSWORD}"
    # Every key it sets is a real option (check would have failed otherwise), and it covers the basics.
    assert {"source", "mountpoint", "cache_dir", "cache_size", "kafka"} <= set(tomllib.loads(
        example.read_text())["mount"])
