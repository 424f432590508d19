"""The demo's speech encoder (mi_jax/train/speech_encoder.py): the small Wav2Vec2 trained on the
synthetic world's voices is written as a transformers `Wav2Vec2Model` folder that transformers
loads whole and runs as we do, and that `prepare` reads as `prepare.wav2vec2`."""

import contextlib
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mi_jax.config_utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`mi-jax train-speech-encoder` with tiny settings: its progress lines and its JSON record."""
    from mi_jax import cli

    spec = os.path.join(ROOT, "configs", "magicinfinite.py:demo,stage1")
    out = str(tmp_path_factory.mktemp("se") / "wav2vec2")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["train-speech-encoder", "--out", out, "--config", spec, *(
            f"--config.speech_encoder_train.{k}={v}"
            for k, v in dict(steps=4, clips=4, batch=2, seconds=1.0, learning_rate=3e-3).items())])
    assert rc == 0
    *lines, last = stdout.getvalue().strip().splitlines()
    return load_config(spec), out, json.loads(last), lines


def test_training_lowers_the_loss_and_writes_a_transformers_folder(trained):
    """Four steps on four clips lower the training loss; the folder is config.json +
    model.safetensors + training.json, with the training record."""
    _, out, record, lines = trained
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "training.json"]
    assert record["last"]["loss"] < record["first"]["loss"], record
    assert 0.0 <= record["heldout_viseme_accuracy"] <= 1.0
    assert lines[0].startswith("speech encoder step 1/4") and lines[-1].startswith("speech encoder step 4/4")


def test_transformers_loads_the_folder_whole_and_runs_it_as_we_do(trained):
    """`Wav2Vec2Model.from_pretrained` reports no missing or unexpected key, and its hidden
    states equal ours within float32 round-off (torch's and XLA's convolutions sum in other orders)."""
    import torch  # the test extra's PyTorch reference
    from transformers import Wav2Vec2Model

    from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2
    from mi_jax.models.wav2vec2 import Wav2Vec2

    _, out, _, _ = trained
    ref, info = Wav2Vec2Model.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg, params = load_transformers_wav2vec2(out)
    x = np.random.default_rng(0).standard_normal((1, 8000)).astype(np.float32)
    ours = Wav2Vec2(cfg).apply({"params": params}, jnp.asarray(x)).hidden_states
    with torch.no_grad():
        theirs = ref.eval()(torch.from_numpy(x), output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(b.numpy()).max()))


def test_prepare_reads_the_folder_as_its_wav2vec2_and_the_features_changed(trained):
    """`prepare.wav2vec2=FOLDER` gives the trained encoder's features (not the random init's)."""
    from mi_jax.data.prepare import Encoders

    cfg, out, _, _ = trained
    audio = np.sin(np.linspace(0, 400 * np.pi, 16000)).astype(np.float32)
    random = Encoders(cfg).audio_at_frames(audio, 25.0, 25)
    cfg_trained = load_config(os.path.join(ROOT, "configs", "magicinfinite.py:demo,stage1"), [f"prepare.wav2vec2={out}"])
    feats = Encoders(cfg_trained).audio_at_frames(audio, 25.0, 25)
    assert feats.shape == random.shape == (25, 4, 32)
    assert np.abs(feats - random).max() > 1e-3  # trained weights, not the random ones


def test_bad_settings_are_refused_before_any_work(tmp_path):
    from mi_jax.train.speech_encoder import train_speech_encoder

    cfg = load_config(os.path.join(ROOT, "configs", "magicinfinite.py:demo,stage1"))
    with pytest.raises(ValueError, match="unknown setting"):
        train_speech_encoder(cfg, str(tmp_path / "a"), stpes=3)
    with pytest.raises(ValueError, match="raise clips"):
        train_speech_encoder(cfg, str(tmp_path / "b"), clips=2, batch=8)
    assert not os.listdir(tmp_path)
