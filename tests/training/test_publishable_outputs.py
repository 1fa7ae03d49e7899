"""What a run lets a user publish: nothing that replays its noise, no non-private statistics."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpllm.config import ConfigError, load_config
from dpllm.privacy.seeds import derive
from dpllm.training import trainer
from tests.launchers import REPO, TINY

RECIPE = REPO / "recipes/e2e/tiny_cpu.yaml"
# the default: no privacy.noise_seed; a short run with an eval set and generation at the end
DEFAULT = [o for o in TINY if not o.startswith("privacy.noise_seed")] + [
    "max_steps=2", "generation.at_end=true", "generation.max_inputs=2", "generation.num_beams=1", "generation.max_new_tokens=4",
]
ROOT = 0x5EC2E7_0DD_BA11_F00D_CAFE_D00D  # stands in for os.urandom, so that the test knows the secret
PRIVATE_KEYS = ("loss", "batch_size", "clipped_fraction", "mean_grad_norm", "dropped_samples", "samples",
                "num_train_examples", "truncated_train", "duplicate_train_rows", "elapsed_s", "train_seconds")


def published(out: Path) -> list[Path]:
    """Every file a user would publish: all of the run folder but its checkpoints and diagnostics."""
    return [p for p in out.rglob("*") if p.is_file() and not {"checkpoints", "diagnostics"} & set(p.relative_to(out).parts)]


def test_a_default_run_cannot_be_replayed_from_what_it_publishes(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(trainer, "secret_seed", lambda: ROOT)
        trainer.train(load_config(RECIPE, DEFAULT + ["checkpoint_every=2", f"output_dir={tmp_path / 'run'}"]))
    files = published(tmp_path / "run")
    names = {str(p.relative_to(tmp_path / "run")) for p in files}
    assert {"config.json", "summary.json", "results.json", "metrics.jsonl", "training.png", "final/privacy.json"} <= names
    secrets = [ROOT, derive(ROOT, "noise"), derive(ROOT, "sampler")]
    for value in secrets:
        for text in (str(value), hex(value)[2:]):
            assert not any(text.encode() in p.read_bytes() for p in files), text
    # the search would have found it: the (secret) checkpoint does hold the noise seed
    assert str(derive(ROOT, "noise")).encode() in (tmp_path / "run/checkpoints/step_2/state.json").read_bytes()

    # Replay from the published config: another secret, other noise, another model.
    replay = [f"output_dir={tmp_path / 'replay'}", "checkpoint_every=0"]
    trainer.train(load_config(tmp_path / "run/config.json", replay))
    released, replayed = (load_file(tmp_path / f"{r}/final/model.safetensors") for r in ("run", "replay"))
    assert any(not torch.equal(released[n], v) for n, v in replayed.items())
    # ... whereas the same config with the secret reproduces the released model bit for bit.
    with monkeypatch.context() as m:
        m.setattr(trainer, "secret_seed", lambda: ROOT)
        trainer.train(load_config(tmp_path / "run/config.json", [f"output_dir={tmp_path / 'insider'}", "checkpoint_every=0"]))
    insider = load_file(tmp_path / "insider/final/model.safetensors")
    assert all(torch.equal(released[n], v) for n, v in insider.items())


def test_a_fixed_noise_seed_is_not_published_and_is_flagged(tmp_path):
    seed = 918273645546372819
    summary = trainer.train(load_config(RECIPE, DEFAULT + [f"privacy.noise_seed={seed}", f"output_dir={tmp_path}"]))
    assert not any(str(seed).encode() in p.read_bytes() for p in published(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["privacy"]["noise_seed"] == "<secret: not recorded>"
    assert summary["seed_secret"] is False and json.loads((tmp_path / "final/privacy.json").read_text())["seed_secret"] is False
    assert "holds only while that number stays secret" in json.loads((tmp_path / "summary.json").read_text())["seed_note"]
    with pytest.raises(ConfigError, match="privacy.noise_seed: expected (int|an integer)"):
        load_config(tmp_path / "config.json")  # the published config does not carry the seed


def test_non_private_statistics_go_to_diagnostics_only_and_can_be_turned_off(tmp_path):
    trainer.train(load_config(RECIPE, DEFAULT + [f"output_dir={tmp_path / 'on'}"]))
    for p in published(tmp_path / "on"):
        if p.suffix in (".json", ".jsonl") and p.name != "config.json":  # the config's batch_size is the expected one
            text = p.read_text()
            assert not any(f'"{key}"' in text for key in PRIVATE_KEYS), (p, [k for k in PRIVATE_KEYS if f'"{k}"' in text])
    diagnostics = (tmp_path / "on/diagnostics/metrics.jsonl").read_text()
    assert "NOT differentially private" in diagnostics.splitlines()[0]
    assert all(f'"{key}"' in diagnostics for key in PRIVATE_KEYS if key != "train_seconds")
    assert "train_seconds" in (tmp_path / "on/diagnostics/summary.json").read_text()
    assert "Publishable" in (tmp_path / "on/metrics.jsonl").read_text().splitlines()[0]

    trainer.train(load_config(RECIPE, DEFAULT + ["privacy.diagnostics_log=false", f"output_dir={tmp_path / 'off'}"]))
    assert not (tmp_path / "off/diagnostics").exists() and (tmp_path / "off/final/privacy.json").is_file()
    with pytest.raises(ConfigError, match="denoise.diagnostics"):
        load_config(RECIPE, ["privacy.diagnostics_log=false", "denoise.diagnostics=true"])


@pytest.mark.parametrize("value", ["abc", "1.5", "true", "[1]"])
def test_a_noise_seed_that_is_not_an_integer_is_named(value):
    with pytest.raises(ConfigError, match="privacy.noise_seed: expected (int|an integer)"):
        load_config(RECIPE, [f"privacy.noise_seed={value}"])
    with pytest.raises(ConfigError, match="privacy.noise_seed: cannot be combined with privacy.secure_mode"):
        load_config(RECIPE, ["privacy.noise_seed=3", "privacy.secure_mode=true"])
