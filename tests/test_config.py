"""Configuration: environment, TOML file and arguments, and one-line errors for bad values."""

import subprocess
import sys
from pathlib import Path

import pytest

from colo import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    c = Config()
    assert c.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (c.host, c.port) == ("127.0.0.1", 8000)


def test_arguments_beat_environment_beat_toml(tmp_path, monkeypatch):
    toml = tmp_path / "colo.toml"
    toml.write_text('port = 7000\nmax_loras = 3\nseed = 5\n')
    monkeypatch.setenv("COLO_CONFIG", str(toml))
    monkeypatch.setenv("COLO_PORT", "7100")
    monkeypatch.setenv("COLO_MAX_LORAS", "6")
    c = Config(max_loras=9)
    assert c.seed == 5  # only in the file
    assert c.port == 7100  # environment over file
    assert c.max_loras == 9  # argument over environment


@pytest.mark.parametrize("var,value,says", [
    ("COLO_PORT", "abc", "integer"),
    ("COLO_PORT", "70000", "65535"),
    ("COLO_DTYPE", "float8", "'bfloat16'"),
    ("COLO_MAX_LORA_RANK", "0", "greater than or equal to 1"),
    ("COLO_GPU_MEMORY_UTILIZATION", "1.5", "less than or equal to 1"),
    ("COLO_SLEEP_LEVEL", "3", "less than or equal to 2"),
    ("COLO_ENGINE", "no such!", "engine name"),
])
def test_bad_environment_value_names_variable_value_and_what_is_allowed(monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        Config()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{var}={value!r}")
    assert says in message


def test_bad_argument_names_the_argument():
    with pytest.raises(ConfigError, match=r"^max_loras=0: .*greater than or equal to 1"):
        Config(max_loras=0)


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        Config(max_lora=3)


def test_missing_toml_file(monkeypatch, tmp_path):
    monkeypatch.setenv("COLO_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="COLO_CONFIG=.*no such file"):
        Config()


def test_api_keys_parse_and_reject_garbage():
    assert Config(api_keys="tml-a:alice, tml-b:bob").api_key_tenants() == {"tml-a": "alice", "tml-b": "bob"}
    with pytest.raises(ConfigError, match="key:tenant"):
        Config(api_keys="justakey").api_key_tenants()


def test_unknown_engine_lists_the_known_ones(tiny_model_dir):
    from colo import Trainer

    with pytest.raises(ConfigError, match=r"COLO_ENGINE='nope': unknown engine; allowed: auto, .*pytorch"):
        Trainer(model=str(tiny_model_dir), engine="nope", dtype="float32")


def test_model_directory_without_config_is_refused(tmp_path):
    from colo import Trainer

    with pytest.raises(ConfigError, match="COLO_MODEL=.*no config.json"):
        Trainer(model=str(tmp_path))


def test_bad_value_fails_the_entry_point_at_start_up_with_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "torchrun_entry.py")], capture_output=True, text=True,
                          env={"PATH": "", "COLO_PORT": "not-a-port"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "colo: COLO_PORT='not-a-port': Input should be a valid integer, unable to parse string as an integer"
