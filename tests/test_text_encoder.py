"""Text encoders: HunyuanTextEncoder on tiny random LLaVA + CLIP models built and saved offline
(checked token-for-token against diffusers' HunyuanVideo-I2V pipeline), and TinyTextEncoder."""

import re

import numpy as np
import pytest

from mi_jax.data.text_encoder import HUNYUAN_I2V_TEMPLATE, HunyuanTextEncoder, TextConditioning, TinyTextEncoder

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<pad>", "<image>"]
N_IMG = 16  # (32 / 8)^2 patches of the tiny vision tower
PROMPTS = ["a woman talks to the camera, smiling", "a man in a red room says hello and waves at the viewer slowly"]


def _bpe_tokenizer(specials, template_single, corpus, vocab_size):
    """A byte-level BPE tokenizer trained offline, split like LLaMA-3's (its tokenizer.json regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template_single, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template_single])
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory, torch):
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    root = tmp_path_factory.mktemp("hunyuan_text")
    corpus = [HUNYUAN_I2V_TEMPLATE.format(p) for p in PROMPTS] * 4 + ["system user assistant " * 8]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(LLAMA_SPECIALS, "<|begin_of_text|> $A", corpus, 600),
        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>", padding_side="right")
    torch.manual_seed(0)
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision_cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=16)
    llava_cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                            image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=N_IMG)
    llava = LlavaForConditionalGeneration(llava_cfg)
    llava.save_pretrained(root / "llava")
    tok.save_pretrained(root / "llava")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "llava")

    clip_specials = ["<|startoftext|>", "<|endoftext|>"]
    clip_tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(clip_specials, "<|startoftext|> $A <|endoftext|>", PROMPTS * 4, 300),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="right")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                        pad_token_id=clip_tok.pad_token_id, projection_dim=24))
    clip.save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def encoder(folders):
    return HunyuanTextEncoder.from_folders(str(folders / "llava"), str(folders / "clip"), max_sequence_length=40)


@pytest.fixture(scope="module")
def portraits():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)


def _diffusers_pipe(enc):
    from diffusers import HunyuanVideoImageToVideoPipeline

    # transformers 5's LlavaConfig has no pad_token_id; the pipeline reads it (HunyuanVideo's config sets it)
    enc.llava.config.pad_token_id = enc.tokenizer.pad_token_id
    pipe = HunyuanVideoImageToVideoPipeline(text_encoder=enc.llava, tokenizer=enc.tokenizer, transformer=None, vae=None,
                                            scheduler=None, text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer,
                                            image_processor=enc.image_processor)
    lay = enc.layout
    template = dict(template=HUNYUAN_I2V_TEMPLATE, crop_start=lay.crop_start, image_emb_start=lay.image_pos,
                    image_emb_end=lay.image_pos + N_IMG, image_emb_len=N_IMG)
    return pipe, template


def test_shapes_and_mask(encoder, portraits):
    out = encoder.encode(PROMPTS, portraits)
    assert isinstance(out, TextConditioning)
    embeds, mask, pooled = out
    L = N_IMG // 2 + 40 - 4
    assert encoder.seq_len == L and (encoder.dim, encoder.pooled_dim) == (32, 24)
    assert embeds.shape == (2, L, 32) and embeds.dtype == np.float32
    assert mask.shape == (2, L) and mask.dtype == np.int32
    assert pooled.shape == (2, 24) and pooled.dtype == np.float32
    for row, prompt in zip(mask, PROMPTS):
        # image tokens + prompt tokens + the "\n\n" after the assistant header, then padding
        n_prompt = len(encoder.tokenizer(prompt, add_special_tokens=False).input_ids)
        n_real = N_IMG // 2 + n_prompt + 1
        assert row[:n_real].all() and not row[n_real:].any()
    assert np.isfinite(embeds).all() and np.isfinite(pooled).all()


def test_template_tokens_are_cropped(encoder):
    lay = encoder.layout
    prefix = encoder.tokenizer(HUNYUAN_I2V_TEMPLATE.split("{}")[0]).input_ids
    assert lay.crop_start == len(prefix) and lay.image_pos == prefix.index(encoder.image_token_id)
    prompts = PROMPTS + [""]  # the empty prompt (classifier-free guidance) keeps only "\n\n"
    ids, mask = encoder.kept_token_ids(prompts)
    assert ids.shape == mask.shape == (3, encoder.seq_len)
    tok = encoder.tokenizer
    for row, m, prompt in zip(ids, mask, prompts):
        assert (row[: N_IMG // 2] == encoder.image_token_id).all()
        # what's left of the template is only the "\n\n" that follows <|end_header_id|>
        assert tok.decode(row[N_IMG // 2:][m[N_IMG // 2:] == 1]) == prompt + "\n\n"
        assert (row[m == 0] == tok.pad_token_id).all()


def test_matches_diffusers_pipeline(encoder, portraits, torch):
    pipe, template = _diffusers_pipe(encoder)
    with torch.no_grad():
        ref_embeds, ref_pooled, ref_mask = pipe.encode_prompt(
            image=list(portraits), prompt=PROMPTS, prompt_template=template, device=torch.device("cpu"),
            max_sequence_length=40, image_embed_interleave=2)
    embeds, mask, pooled = encoder.encode(PROMPTS, portraits)
    np.testing.assert_array_equal(mask, ref_mask.numpy())  # integer masks
    np.testing.assert_allclose(embeds, ref_embeds.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("skip, interleave", [(0, 1), (3, 4)])
def test_matches_diffusers_other_layer_and_interleave(encoder, portraits, torch, skip, interleave):
    enc = HunyuanTextEncoder(encoder.llava, encoder.tokenizer, encoder.image_processor, encoder.clip,
                             encoder.clip_tokenizer, max_sequence_length=40, num_hidden_layers_to_skip=skip,
                             image_embed_interleave=interleave)
    pipe, template = _diffusers_pipe(enc)
    with torch.no_grad():
        ref_embeds, ref_mask = pipe._get_llama_prompt_embeds(
            list(portraits[:1]), PROMPTS[:1], template, device=torch.device("cpu"), max_sequence_length=40,
            num_hidden_layers_to_skip=skip, image_embed_interleave=interleave)
    embeds, mask, _ = enc.encode(PROMPTS[:1], portraits[:1])
    assert embeds.shape[1] == enc.seq_len == -(-N_IMG // interleave) + 36
    np.testing.assert_array_equal(mask, ref_mask.numpy())  # integer masks
    np.testing.assert_allclose(embeds, ref_embeds.numpy(), rtol=0, atol=1e-6)


def test_truncated_prompt_matches_diffusers(encoder, portraits, torch):
    long_prompt = " ".join(["a woman talks to the camera"] * 20)
    pipe, template = _diffusers_pipe(encoder)
    with torch.no_grad():
        ref_embeds, ref_mask = pipe._get_llama_prompt_embeds(
            list(portraits[:1]), [long_prompt], template, device=torch.device("cpu"), max_sequence_length=40)
    embeds, mask, _ = encoder.encode(long_prompt, portraits[0])
    assert mask.all() and embeds.shape == (1, encoder.seq_len, 32)
    np.testing.assert_array_equal(mask, ref_mask.numpy())  # integer masks
    np.testing.assert_allclose(embeds, ref_embeds.numpy(), rtol=0, atol=1e-6)


def test_portrait_changes_tokens(encoder, portraits):
    a = encoder.encode(PROMPTS[0], portraits[0])
    b = encoder.encode(PROMPTS[0], portraits[1])
    again = encoder.encode(PROMPTS[0], portraits[0])
    np.testing.assert_array_equal(a.prompt_embeds, again.prompt_embeds)  # same program, same inputs
    n = N_IMG // 2
    assert np.abs(a.prompt_embeds[0, :n] - b.prompt_embeds[0, :n]).min() > 0  # image tokens
    assert np.abs(a.prompt_embeds[0, n:n + 5] - b.prompt_embeds[0, n:n + 5]).max() > 1e-3  # text sees the image
    np.testing.assert_array_equal(a.pooled, b.pooled)  # CLIP reads the text only
    other = encoder.encode(PROMPTS[1], portraits[0])
    assert np.abs(a.pooled - other.pooled).max() > 1e-3


def test_batching_is_independent(encoder, portraits):
    enc = HunyuanTextEncoder(encoder.llava, encoder.tokenizer, encoder.image_processor, encoder.clip,
                             encoder.clip_tokenizer, max_sequence_length=40, batch_size=1)
    one_by_one = enc.encode(PROMPTS, portraits)
    together = encoder.encode(PROMPTS, portraits)
    for x, y in zip(one_by_one, together):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_diffusers_folder_layout(folders, encoder, portraits, tmp_path):
    for sub, src in [("text_encoder", "llava"), ("tokenizer", "llava"), ("image_processor", "llava"),
                     ("text_encoder_2", "clip"), ("tokenizer_2", "clip")]:
        (tmp_path / sub).symlink_to(folders / src, target_is_directory=True)
    enc = HunyuanTextEncoder.from_diffusers_folder(str(tmp_path), max_sequence_length=40)
    for x, y in zip(enc.encode(PROMPTS[0], portraits[0]), encoder.encode(PROMPTS[0], portraits[0])):
        np.testing.assert_array_equal(x, y)  # the same weights through a symlinked folder: the same program


def test_template_errors(encoder):
    parts = (encoder.llava, encoder.tokenizer, encoder.image_processor, encoder.clip, encoder.clip_tokenizer)
    with pytest.raises(ValueError, match="exactly one"):
        HunyuanTextEncoder(*parts, template="<image> no prompt slot")
    t2v_like = "<|start_header_id|>system<|end_header_id|>\n\n<image>\n{}<|eot_id|>"
    with pytest.raises(ValueError, match=re.escape("assistant<|end_header_id|> (HunyuanVideo")):
        HunyuanTextEncoder(*parts, template=t2v_like)


def test_hunyuan_errors(folders, encoder, portraits, tmp_path):
    with pytest.raises(ValueError, match="portrait"):
        encoder.encode(PROMPTS)
    with pytest.raises(ValueError, match="2 prompts"):
        encoder.encode(PROMPTS, [portraits[0]] * 3)
    with pytest.raises(ValueError, match="template token"):
        encoder.encode("look <image> here", portraits[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encoder.encode(PROMPTS[0], portraits[0].astype(np.float32))
    with pytest.raises(ValueError, match="num_hidden_layers_to_skip"):
        HunyuanTextEncoder(encoder.llava, encoder.tokenizer, encoder.image_processor, encoder.clip,
                           encoder.clip_tokenizer, num_hidden_layers_to_skip=4)
    with pytest.raises(ValueError, match="not a local folder"):
        HunyuanTextEncoder.from_folders(str(tmp_path / "missing"), str(folders / "clip"))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        HunyuanTextEncoder.from_folders(str(folders / "llava"), str(folders / "clip"),
                                        image_processor_dir=str(folders / "clip"))


def test_tiny_shapes_and_mask():
    enc = TinyTextEncoder(dim=32, pooled_dim=16, max_length=12, num_image_tokens=4)
    embeds, mask, pooled = enc.encode(["a cat", "one two three, four"])
    assert embeds.shape == (2, 16, 32) and mask.shape == (2, 16) and pooled.shape == (2, 16)
    assert embeds.dtype == np.float32 and mask.dtype == np.int32 and pooled.dtype == np.float32
    # words + end token, padding at the end; without a portrait the image slots are not used
    assert mask[0].tolist() == [1] * 3 + [0] * 13
    assert mask[1].tolist() == [1] * 6 + [0] * 10
    assert not embeds[mask == 0].any()
    with_image = enc.encode(["a cat"], np.zeros((20, 30, 3), np.uint8))
    assert with_image.prompt_attention_mask[0].tolist() == [1] * 7 + [0] * 9
    assert enc.encode("")[1][0].sum() == 1  # the end token keeps an empty prompt attendable


def test_tiny_is_deterministic_and_discriminative():
    a = TinyTextEncoder(32, 16, 12)
    b = TinyTextEncoder(32, 16, 12)
    x, y = a.encode(["a cat sings"]), b.encode(["A cat sings"])
    for u, v in zip(x, y):
        np.testing.assert_array_equal(u, v)  # same seed, same program
    z = a.encode(["a dog sings"])
    assert np.abs(x.prompt_embeds[0, 1] - z.prompt_embeds[0, 1]).max() > 0.1
    # causal: position 0 sees the same token
    np.testing.assert_array_equal(x.prompt_embeds[0, 0], z.prompt_embeds[0, 0])
    assert np.abs(x.pooled - z.pooled).max() > 1e-3
    # word order matters through the position code
    w = a.encode(["sings cat a"])
    assert np.abs(x.prompt_embeds - w.prompt_embeds).max() > 0.1
    other_seed = TinyTextEncoder(32, 16, 12, seed=1).encode(["a cat sings"])
    assert np.abs(x.prompt_embeds - other_seed.prompt_embeds).max() > 0.1


def test_tiny_portrait_and_truncation():
    enc = TinyTextEncoder(8, 8, 5, num_image_tokens=2)
    rng = np.random.default_rng(0)
    im1, im2 = rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    a, b = enc.encode("hi there", im1), enc.encode("hi there", im2)
    assert np.abs(a.prompt_embeds[0, :2] - b.prompt_embeds[0, :2]).max() > 1e-3
    # same program; text positions see the same inputs
    np.testing.assert_array_equal(a.prompt_embeds[0, 2:], b.prompt_embeds[0, 2:])
    np.testing.assert_array_equal(a.pooled, b.pooled)  # same program; CLIP reads the same text
    # float [0, 1] and uint8 portraits agree; tiny images (< 8 px) work
    c = enc.encode("hi there", im1.astype(np.float32) / 255)
    np.testing.assert_allclose(a.prompt_embeds, c.prompt_embeds, atol=1e-5)
    assert np.isfinite(enc.encode("x", np.full((3, 5, 3), 9, np.uint8)).prompt_embeds).all()
    long = enc.encode("one two three four five six seven", im1)
    assert long.prompt_attention_mask.all() and long.prompt_embeds.shape == (1, 7, 8)
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="shape"):
        enc.encode("x", np.zeros((4, 4, 2), np.uint8))
