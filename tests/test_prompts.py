"""Prompt words the model never saw in training (the tiny text encoder hashes each word to its
own vector, so such a word means nothing): generation says so in a notice instead of silence."""

import os

import pytest

from conftest import CONFIGS, write_talk_inputs
from mi_jax.config_utils import load_config
from mi_jax.data import synthetic
from mi_jax.data.inputs import prompt_notices
from mi_jax.data.text_encoder import TinyTextEncoder, prompt_words


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("prompt_inputs"), 1_000_007, 1.2)


def test_unknown_words_split_as_encode_ignores_punctuation_and_case():
    enc = TinyTextEncoder(8, 4, 16, vocabulary=["a", "Person", "talking", "nodding"])
    assert enc.unknown_words("A person talking, NODDING.") == []
    assert enc.unknown_words("A person, dancing! Dancing happily; nodding?") == ["dancing", "happily"]
    assert enc.unknown_words("a person's talking") == ["s"]  # the encoder splits "person's" in 3 tokens
    assert enc.unknown_words("...!?") == [] and enc.unknown_words("") == []
    assert prompt_words("Looking-left, smiling.") == ["looking", "left", "smiling"]
    # no vocabulary: nothing can be called unknown
    assert TinyTextEncoder(8, 4, 16).unknown_words("a person dancing") == []
    assert TinyTextEncoder(8, 4, 16, vocabulary=()).unknown_words("a person dancing") == []
    with pytest.raises(ValueError, match="iterable of words"):
        TinyTextEncoder(8, 4, 16, vocabulary="a person")


def test_config_vocabulary_is_the_training_prompts_words():
    tiny = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage2")).prepare.text_vocabulary
    assert tiny == ("a", "person", "talking", "nodding", "shaking", "head", "smiling", "looking", "left", "right")
    assert all(w in tiny for p in synthetic.TRAINING_PROMPTS for w in prompt_words(p))
    assert load_config(os.path.join(CONFIGS, "magicinfinite.py:full,stage2")).prepare.text_vocabulary == ()
    # every known action is offered, with the canonical phrasing as the example
    (note,) = prompt_notices("a person dancing", tiny)
    assert '"dancing"' in note and "nodding, shaking head, smiling, looking left, looking right" in note
    assert '"a person talking, nodding"' in note
    # a vocabulary without some action's words offers only the others
    (note,) = prompt_notices("a person dancing", ("a", "person", "talking", "smiling"))
    assert "Known actions: smiling (" in note


def test_unseen_word_gives_a_notice_through_the_pipeline(tiny_run, inputs):
    from mi_jax.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(tiny_run)
    assert pipe.enc.text.vocabulary  # the run's config carries prepare.text_vocabulary
    video = pipe.generate(str(inputs / "portrait.png"), str(inputs / "voice.wav"), "A person dancing, happily!",
                          seconds=1.0, steps=2)
    assert len(video.frames) == 25
    unseen = [n for n in video.notices if n.startswith("prompt:")]
    assert len(unseen) == 1 and '"dancing", "happily"' in unseen[0] and "Known actions:" in unseen[0], video.notices
    assert unseen == [n for n in pipe.notices if n.startswith("prompt:")]
    # known words (any case, punctuation): no notice; `latents` reads the request without running a window
    for prompt in (*synthetic.TRAINING_PROMPTS, "A person talking: Shaking head, smiling!", ""):
        pipe.latents(str(inputs / "portrait.png"), str(inputs / "voice.wav"), prompt, seconds=1.0, steps=2)
        assert not [n for n in pipe.notices if n.startswith("prompt:")], (prompt, pipe.notices)


def test_cli_says_it_before_loading_the_model(tiny_run, inputs, tmp_path, capsys, monkeypatch):
    from mi_jax.cli import main as cli
    from mi_jax.pipeline import Pipeline

    class Loaded(Exception):
        pass

    def from_checkpoint(*args, **kwargs):
        raise Loaded  # the model load (and the compute after it) is where the CLI stops here

    monkeypatch.setattr(Pipeline, "from_checkpoint", from_checkpoint)
    with pytest.raises(Loaded):
        cli(["generate", "--checkpoint", tiny_run, "--portrait", str(inputs / "portrait.png"),
             "--audio", str(inputs / "voice.wav"), "--prompt", "a person dancing", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert 'note: prompt: the model has never seen the word "dancing"; it will have no effect.' in err, err
