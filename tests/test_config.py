"""Config: defaults, lookup order, overrides, and the exact error texts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import REPO

from htrctl.config import Settings, load_settings
from htrctl.errors import ConfigError, ExitCode


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "htr.yaml"
    p.write_text(text)
    return p


def test_defaults_without_any_file():
    s = load_settings(env={})
    assert s.source == "<defaults>"
    assert s.gpu.select == "most-free"
    assert s.socket.mode == 0o660
    assert s.limits.batch_sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_shipped_config_equals_the_defaults():
    """configs/htr.yaml documents every field with its default: keep them in step."""
    shipped = yaml.safe_load((REPO / "configs" / "htr.yaml").read_text())
    defaults = Settings().model_dump(mode="python")
    loaded = load_settings(REPO / "configs" / "htr.yaml", env={}).model_dump(mode="python")
    assert loaded == defaults
    for section, fields in defaults.items():
        assert set(shipped[section]) == set(fields), f"configs/htr.yaml section {section!r} out of step"


def test_lookup_order_explicit_then_env(tmp_path):
    a = write(tmp_path, "log: {level: DEBUG}\n")
    b = tmp_path / "b.yaml"
    b.write_text("log: {level: ERROR}\n")
    assert load_settings(a, env={"HTR_CONFIG": str(b)}).log.level == "DEBUG"
    assert load_settings(None, env={"HTR_CONFIG": str(b)}).log.level == "ERROR"


def test_env_override_beats_file(tmp_path):
    p = write(tmp_path, "gpu: {select: first}\nlimits: {queue_length: 10}\n")
    s = load_settings(p, env={"HTR_GPU__SELECT": "0", "HTR_LIMITS__QUEUE_LENGTH": "64"})
    assert s.gpu.select == "0"
    assert s.limits.queue_length == 64


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "model: {dirr: /x}\n",
            "{f}: model.dirr: unknown setting (allowed: dir, variant, dtype, verify_on_start)",
        ),
        (
            "gpu: {select: '0,1'}\n",
            "{f}: gpu.select: '0,1' would use several GPUs; the model must live on one GPU "
            "(run one replica per GPU with htr@.service instead)",
        ),
        (
            "gpu: {select: banana}\n",
            "{f}: gpu.select: 'banana' is not a GPU UUID (GPU-xxxxxxxx-...), an index, or one of "
            "('most-free', 'first', 'cpu')",
        ),
        (
            "log: {level: verbose}\n",
            "{f}: log.level: invalid value 'VERBOSE': allowed: 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
        ),
        (
            "socket: {mode: 0o666}\n",
            "{f}: socket.mode: 0o666 gives other users access; use 0o660 or stricter",
        ),
        (
            "limits: {queue_length: 0}\n",
            "{f}: limits.queue_length: Input should be greater than or equal to 1",
        ),
        ("colour: red\n", "{f}: colour: unknown setting (allowed: model, gpu, socket, limits, generation, watchdog, log)"),
    ],
)
def test_bad_values_name_file_field_and_allowed(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={})
    assert ei.value.message == "invalid configuration: " + expected.format(f=p)
    assert ei.value.exit_code == ExitCode.CONFIG == 78


def test_bad_env_override_names_the_variable():
    with pytest.raises(ConfigError) as ei:
        load_settings(env={"HTR_LIMITS__BATCH_SIZES": "[0]"})
    assert ei.value.message == (
        "invalid configuration: $HTR_LIMITS__BATCH_SIZES: limits.batch_sizes: "
        "must be a non-empty list of integers between 1 and 1024"
    )


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "gpu:\n  select: [\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={})
    assert ei.value.message.startswith(f"{p}: line 3, column 1 is not valid YAML")


def test_top_level_must_be_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, not list"):
        load_settings(p, env={})


def test_an_explicit_config_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_a_queue_shorter_than_the_slots_is_accepted(tmp_path):
    """Slots fill from the queue as lines leave (continuous batching): limits.queue_length bounds the lines
    waiting, not the lines decoding -- a short queue beside the default batch sizes (up to 256) is valid."""
    s = load_settings(write(tmp_path, "limits: {queue_length: 10}\n"), env={})
    assert (s.limits.queue_length, max(s.limits.batch_sizes)) == (10, 256)


def test_socket_mode_accepts_octal_strings_from_env_and_yaml(tmp_path):
    assert load_settings(env={"HTR_SOCKET__MODE": "0o640"}).socket.mode == 0o640
    assert load_settings(write(tmp_path, "socket: {mode: 0600}\n"), env={}).socket.mode == 0o600
