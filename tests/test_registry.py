"""Engine lookup: built-ins, and third-party engines found through the ``colo.engines`` entry points."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from colo import ConfigError, SamplingParams
from engines.base import InferenceEngine
from engines.pytorch.engine import PyTorchEngine
from engines.registry import engine_class, engine_names, resolve_name

PLUGIN = '''
from colo.types import SampledSequence
from engines.base import Capabilities, InferenceEngine, Samples


class ReverseEngine(InferenceEngine):
    """Answers each prompt with its tokens reversed: enough to see that colo called it."""
    name = "reverse"
    capabilities = Capabilities(False, True, False, False, True)

    def __init__(self, context):
        super().__init__(context)
        self.published = []

    def publish(self, update):
        self.published.append(update.key)

    def release(self, adapter):
        pass

    def sample(self, requests):
        return [Samples([SampledSequence(r.prompt[::-1], [0.0] * len(r.prompt), "stop")] * r.num_samples)
                for r in requests]
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    (tmp_path / "colo_reverse_engine.py").write_text(PLUGIN)
    dist = tmp_path / "colo_reverse_engine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: colo-reverse-engine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [colo.engines]
        reverse = colo_reverse_engine:ReverseEngine
        broken = colo_reverse_engine:NotThere
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("colo_reverse_engine", None)


def test_builtin_engines():
    assert "pytorch" in engine_names()
    assert engine_class("pytorch") is PyTorchEngine
    assert PyTorchEngine.capabilities.shares_trainer_weights


def test_auto_is_vllm_where_vllm_imports_and_pytorch_where_it_does_not(monkeypatch):
    import importlib.util

    assert importlib.util.find_spec("vllm") is not None  # the project installs vllm(-cpu) on every machine
    assert resolve_name("auto") == "vllm"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert resolve_name("auto") == "pytorch"
    assert resolve_name("vllm") == "vllm"  # a named engine is taken as named


def test_third_party_engine_is_found_and_used(installed_plugin, tiny_model_dir):
    from colo import Trainer

    assert {"reverse", "broken"} <= set(engine_names())
    with Trainer(model=str(tiny_model_dir), engine="reverse", dtype="float32") as t:
        adapter = t.create_lora(rank=4)
        t.forward_backward(adapter, [__import__("colo").Datum.from_sequence([1, 2, 3])])
        t.optim_step(adapter)
        assert [(k.adapter, k.version) for k in t.engine.published] == [(adapter, 0), (adapter, 1)]
        result = t.sample(adapter, [[4, 5, 6]], 2, SamplingParams(max_tokens=3))[0]
        assert [s.tokens for s in result.sequences] == [[6, 5, 4]] * 2
        assert result.adapter_version == 1


def test_switching_to_an_engine_that_cannot_serve_a_live_adapter_is_refused(installed_plugin, tiny_model_dir):
    from colo import Trainer

    with Trainer(model=str(tiny_model_dir), engine="pytorch", dtype="float32") as t:
        adapter = t.create_lora(rank=4, train_unembed=True)
        with pytest.raises(ConfigError, match=rf"COLO_ENGINE='reverse': the reverse engine does not apply LoRA to the "
                                              rf"output layer of LlamaForCausalLM, which adapter\(s\) {adapter} train"):
            t.set_engine("reverse")
        assert t.engine.name == "pytorch"  # the old engine serves on


def test_entry_point_that_is_not_an_engine_is_refused(installed_plugin):
    with pytest.raises(ConfigError, match="COLO_ENGINE='broken': cannot load colo_reverse_engine:NotThere"):
        engine_class("broken")
    assert issubclass(engine_class("reverse"), InferenceEngine)


def test_unknown_engine_name():
    with pytest.raises(ConfigError, match="unknown engine"):
        engine_class("nope")


def test_colo_engines_shows_every_builtin_engines_capabilities():
    proc = subprocess.run([sys.executable, "-m", "colo.cli", "engines"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    for name in ("pytorch", "vllm", "vllm-http", "sglang", "mlx", "openai"):
        assert lines[name].startswith("Capabilities("), (name, lines[name])
    assert "unembed_lora=True" in lines["vllm"]


def test_an_engine_gets_its_own_settings_not_the_whole_configuration(trainer):
    from colo import Config
    from engines.base import EngineSettings
    from engines.http_engine import HTTPSettings
    from engines.vllm_engine import VLLMSettings

    config = Config(api_keys="tml-secret:t", max_loras=6, vllm_enforce_eager=True, engine_url="http://127.0.0.1:9")
    shared = EngineSettings.of(config)
    assert shared.max_loras == 6
    assert not hasattr(shared, "api_keys") and not hasattr(shared, "checkpoint_dir")
    assert not any(hasattr(shared, k) for k in ("vllm_enforce_eager", "engine_url", "pytorch_compile"))
    vllm = VLLMSettings.of(config)  # an engine's own fields come only to that engine
    assert vllm.vllm_enforce_eager and vllm.max_loras == 6 and not hasattr(vllm, "engine_url")
    assert HTTPSettings.of(config).engine_url == "http://127.0.0.1:9" and not hasattr(HTTPSettings.of(config),
                                                                                       "vllm_enforce_eager")
    assert type(trainer.engine.context.settings) is type(trainer.engine).settings_class
    assert not hasattr(trainer.engine.context, "policy")
