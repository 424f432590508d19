"""Text conditioning for the DiT: prompt (+ portrait) -> (prompt_embeds, attention mask, pooled).

Every encoder returns a `TextConditioning` (a NamedTuple, so it unpacks as a 3-tuple):

    prompt_embeds          [B, L, D] float32 -> DiT `encoder_hidden_states`   (D = text_embed_dim)
    prompt_attention_mask  [B, L]    int32   -> DiT `encoder_attention_mask` (1 = real token)
    pooled                 [B, P]    float32 -> DiT `pooled_projections`      (P = pooled_projection_dim)

Real tokens come first and padding is at the end of every row, so `L` is fixed per encoder
(`encoder.seq_len`) and batches of different prompts stack.

`HunyuanTextEncoder` is the HunyuanVideo-I2V / MagicInfinite encoder: LLaVA (LLaMA-3 + CLIP
vision tower) reads the portrait and the prompt inside the I2V prompt template; the hidden
states `num_hidden_layers_to_skip` layers below the top are the condition, with the template's
own tokens cropped exactly as diffusers' `HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds`
crops them; a CLIP text model gives the pooled vector. It runs in torch (frozen preprocessing
whose outputs the data pipeline caches). Layout of one row:

    [image tokens (every `image_embed_interleave`-th of LLaVA's N image features)]
    [prompt tokens] ["\\n\\n" after the assistant header] [padding]

so `L = ceil(N / image_embed_interleave) + max_sequence_length - 4`: the tokenizer reads
`crop_start + max_sequence_length` tokens, the template prefix (`crop_start` tokens) and the
4 tokens `<|eot_id|><|start_header_id|>assistant<|end_header_id|>` are dropped.

`TinyTextEncoder` is a deterministic stand-in (hashed words -> fixed pseudo-random vectors) with
the same interface, for tests and the synthetic world.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Protocol, Sequence

import numpy as np

# HunyuanVideo-I2V's LLaVA prompt template (diffusers' DEFAULT_PROMPT_TEMPLATE for I2V).
HUNYUAN_I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
    "aspects according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
IMAGE_TOKEN = "<image>"
END_HEADER_TOKEN = "<|end_header_id|>"
# <|eot_id|> <|start_header_id|> assistant <|end_header_id|>: what HunyuanVideo drops after the prompt
ASSISTANT_HEADER_LEN = 4


class TextConditioning(NamedTuple):
    prompt_embeds: np.ndarray  # [B, L, D] float32
    prompt_attention_mask: np.ndarray  # [B, L] int32, real tokens first, padding at the end
    pooled: np.ndarray  # [B, P] float32


class TextEncoder(Protocol):
    dim: int  # D
    pooled_dim: int  # P
    seq_len: int  # L

    def encode(self, prompts: str | Sequence[str], images=None) -> TextConditioning: ...


def _as_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}.")
    return prompts


def _as_images(images, batch: int) -> list[np.ndarray]:
    """Portraits -> list of B uint8 [H, W, 3] arrays.

    Accepts a uint8 [B, H, W, 3] array, a single [H, W, 3] image (shared by all prompts), or a
    list of B images (uint8, float in [0, 1], or PIL images; sizes may differ).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images] * batch
    if len(images) != batch:
        raise ValueError(f"got {len(images)} images for {batch} prompts; "
                         "pass one portrait per prompt (or one for all).")
    out = []
    for i, im in enumerate(images):
        arr = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
            raise ValueError(f"image {i} has shape {arr.shape}; expected [H, W, 3] (RGB).")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and (arr.min() < 0 or arr.max() > 1):
                raise ValueError(f"float image {i} has values in [{arr.min():.3g}, {arr.max():.3g}]; "
                                 "expected [0, 1] (or uint8).")
            arr = np.round(np.clip(arr.astype(np.float64), 0, 1) * 255).astype(np.uint8)
        out.append(arr)
    return out


# --------------------------------------------------------------------------------------------
# HunyuanVideo-I2V: LLaVA hidden states + CLIP pooled
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TemplateLayout:
    crop_start: int  # tokens before the prompt (BOS + template prefix)
    image_pos: int  # index of the single <image> token
    num_end_headers: int  # <|end_header_id|> tokens in the full template (3 for HunyuanVideo)
    prefix_ids: list[int]  # the crop_start tokens every row starts with


class HunyuanTextEncoder:
    """LLaVA prompt+portrait embeddings and CLIP pooled text embedding, as HunyuanVideo-I2V.

    Build with `from_folders` (or `from_diffusers_folder` for a HunyuanVideo-I2V diffusers
    checkout) rather than the constructor. `encode(prompts, images)` needs one portrait per
    prompt: the I2V template has an <image> slot.
    """

    def __init__(self, llava, tokenizer, image_processor, clip, clip_tokenizer, *,
                 template: str = HUNYUAN_I2V_TEMPLATE, max_sequence_length: int = 256,
                 num_hidden_layers_to_skip: int = 2, image_embed_interleave: int = 2, clip_max_length: int = 77,
                 batch_size: int = 8):
        """llava: LlavaForConditionalGeneration; tokenizer: its LLaMA-3 tokenizer; image_processor: its
        CLIPImageProcessor; clip: CLIPTextModel; clip_tokenizer: its tokenizer.

        max_sequence_length: text tokens read after the template prefix (diffusers' argument, 256);
        num_hidden_layers_to_skip: take hidden_states[-(skip + 1)]; image_embed_interleave: keep
        every k-th image token (2 for HunyuanVideo-I2V latent_concat, 4 for token_replace).
        """
        import torch  # noqa: F401  (local: the torch extra; fail here, not mid-encode, without it)

        if template.count("{}") != 1 or template.count(IMAGE_TOKEN) != 1:
            raise ValueError("template must contain exactly one '{}' (the prompt) and one '<image>'.")
        num_layers = llava.config.text_config.num_hidden_layers
        if not 0 <= num_hidden_layers_to_skip < num_layers:
            raise ValueError(f"num_hidden_layers_to_skip={num_hidden_layers_to_skip} must be in [0, {num_layers}) "
                             f"for this {num_layers}-layer LLaVA.")
        if not 1 <= image_embed_interleave <= 5:
            # diffusers ignores values outside 1..5; HunyuanVideo uses 2 (latent_concat) or 4 (token_replace)
            raise ValueError(f"image_embed_interleave={image_embed_interleave} must be in 1..5.")
        if max_sequence_length <= ASSISTANT_HEADER_LEN:
            raise ValueError(f"max_sequence_length={max_sequence_length} must exceed {ASSISTANT_HEADER_LEN}.")
        if tokenizer.pad_token_id is None:
            raise ValueError("the LLaVA tokenizer has no pad token; set `pad_token` in its tokenizer_config.json.")
        tokenizer.padding_side = "right"  # the crop below assumes real tokens first
        clip_tokenizer.padding_side = "right"
        self.llava, self.tokenizer, self.image_processor = llava.eval(), tokenizer, image_processor
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.template = template
        self.max_sequence_length = max_sequence_length
        self.num_hidden_layers_to_skip = num_hidden_layers_to_skip
        self.image_embed_interleave = image_embed_interleave
        self.clip_max_length = clip_max_length
        self.batch_size = batch_size
        self.image_token_id = llava.config.image_token_id
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN!r} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} "
                             f"but the LLaVA config's image_token_id is {self.image_token_id}; "
                             "use the tokenizer saved with the model.")
        self.end_header_id = tokenizer.convert_tokens_to_ids(END_HEADER_TOKEN)
        if self.end_header_id is None or self.end_header_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {END_HEADER_TOKEN!r} token; "
                             "HunyuanVideo's template needs a LLaMA-3 tokenizer.")
        self.layout = self._template_layout()
        self.num_image_tokens = self._num_image_features()
        self.dim = llava.config.text_config.hidden_size
        self.pooled_dim = clip.config.hidden_size
        kept_image_tokens = -(-self.num_image_tokens // image_embed_interleave)
        self.seq_len = kept_image_tokens + max_sequence_length - ASSISTANT_HEADER_LEN

    @classmethod
    def from_folders(cls, llava_dir: str, clip_dir: str, *, tokenizer_dir: str | None = None,
                     image_processor_dir: str | None = None, clip_tokenizer_dir: str | None = None,
                     device: str = "cpu", dtype=None, **kwargs) -> "HunyuanTextEncoder":
        """Load from local `save_pretrained` folders (never the hub).

        llava_dir: `LlavaForConditionalGeneration` weights; its tokenizer and image processor are
        read from the same folder unless `tokenizer_dir` / `image_processor_dir` say otherwise.
        clip_dir: `CLIPTextModel` weights (+ tokenizer unless `clip_tokenizer_dir`).
        dtype: torch dtype of the weights, default float32 (CPU); bfloat16 halves GPU memory.
        kwargs go to __init__.
        """
        import torch  # local: the torch extra, for the real encoder only
        from transformers import (AutoImageProcessor, AutoTokenizer, CLIPTextModel,  # local: the torch extra
                                  LlavaForConditionalGeneration)

        dirs = {"llava_dir": llava_dir, "clip_dir": clip_dir, "tokenizer_dir": tokenizer_dir or llava_dir,
                "image_processor_dir": image_processor_dir or llava_dir,
                "clip_tokenizer_dir": clip_tokenizer_dir or clip_dir}
        for name, d in dirs.items():
            if not os.path.isdir(d):
                raise ValueError(f"{name}={d!r} is not a local folder; pass a folder written by save_pretrained.")
        for name, d, f in [("llava_dir", llava_dir, "config.json"), ("clip_dir", clip_dir, "config.json"),
                           ("image_processor_dir", dirs["image_processor_dir"], "preprocessor_config.json")]:
            if not os.path.isfile(os.path.join(d, f)):
                raise ValueError(f"{name}={d!r} has no {f}; it must be a save_pretrained folder.")
        dtype = dtype or torch.float32
        load = dict(local_files_only=True)
        llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=dtype, **load).to(device)
        clip = CLIPTextModel.from_pretrained(clip_dir, dtype=dtype, **load).to(device)
        tokenizer = AutoTokenizer.from_pretrained(dirs["tokenizer_dir"], **load)
        clip_tokenizer = AutoTokenizer.from_pretrained(dirs["clip_tokenizer_dir"], **load)
        image_processor = AutoImageProcessor.from_pretrained(dirs["image_processor_dir"], **load)
        return cls(llava, tokenizer, image_processor, clip, clip_tokenizer, **kwargs)

    @classmethod
    def from_diffusers_folder(cls, root: str, **kwargs) -> "HunyuanTextEncoder":
        """Load the encoders of a local HunyuanVideo-I2V diffusers folder (text_encoder/, tokenizer/,
        image_processor/, text_encoder_2/, tokenizer_2/)."""
        sub = lambda name: os.path.join(root, name)  # noqa: E731
        return cls.from_folders(sub("text_encoder"), sub("text_encoder_2"), tokenizer_dir=sub("tokenizer"),
                                image_processor_dir=sub("image_processor"), clip_tokenizer_dir=sub("tokenizer_2"),
                                **kwargs)

    def _template_layout(self) -> _TemplateLayout:
        prefix, suffix = self.template.split("{}")
        prefix_ids = self.tokenizer(prefix)["input_ids"]
        # the prompt must start a fresh token after the prefix, or cropping would cut into it
        probe = self.tokenizer(self.template.format("hello world"))["input_ids"]
        if probe[: len(prefix_ids)] != prefix_ids:
            raise ValueError("the template prefix tokenizes differently on its own than before a prompt; "
                             "end the prefix with a special token or whitespace the tokenizer keeps separate.")
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if self.end_header_id not in suffix_ids or suffix_ids.index(self.end_header_id) + 1 != ASSISTANT_HEADER_LEN:
            raise ValueError(f"the template must follow the prompt with {ASSISTANT_HEADER_LEN} tokens "
                             "<|eot_id|><|start_header_id|>assistant<|end_header_id|> (HunyuanVideo's crop); "
                             f"this tokenizer gives {self.tokenizer.convert_ids_to_tokens(suffix_ids)}.")
        return _TemplateLayout(crop_start=len(prefix_ids), image_pos=prefix_ids.index(self.image_token_id),
                               num_end_headers=probe.count(self.end_header_id), prefix_ids=prefix_ids)

    def _num_image_features(self) -> int:
        # LLaVA's vision features per image: one per patch, plus CLS unless the "default" strategy drops it
        cfg, vc = self.llava.config, self.llava.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")

    def encode(self, prompts: str | Sequence[str], images=None) -> TextConditioning:
        """prompts: str or B strings; images: B portraits (see `_as_images`), required.

        Returns TextConditioning with L = self.seq_len, D = self.dim, P = self.pooled_dim.
        """
        prompts = _as_prompts(prompts)
        if images is None:
            raise ValueError("HunyuanTextEncoder needs the portrait: the I2V template has an <image> slot; "
                             "pass images=.")
        images = _as_images(images, len(prompts))
        ids, mask = self._tokenize(prompts)  # all up front, so a bad prompt fails before any compute
        n = self.batch_size
        parts = [self._encode_batch(prompts[i:i + n], ids[i:i + n], mask[i:i + n], images[i:i + n])
                 for i in range(0, len(prompts), n)]
        return TextConditioning(*(np.concatenate(x) for x in zip(*parts)))

    def _tokenize(self, prompts: list[str]):
        """-> input_ids, attention_mask: torch [B, crop_start + max_sequence_length]."""
        for p in prompts:
            if IMAGE_TOKEN in p or END_HEADER_TOKEN in p:
                raise ValueError(f"prompt {p!r} contains a template token ({IMAGE_TOKEN} or {END_HEADER_TOKEN}); "
                                 "remove it.")
        tok = self.tokenizer([self.template.format(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.max_sequence_length + self.layout.crop_start, return_tensors="pt")
        prefix = self.layout.prefix_ids
        for p, row in zip(prompts, tok.input_ids.tolist()):
            if row[: len(prefix)] != prefix:
                raise ValueError(f"prompt {p!r} merges with the template's last token; strip leading whitespace.")
        return tok.input_ids, tok.attention_mask

    def _assistant_starts(self, ids) -> list[int]:
        """Per row, the text index just after the assistant header's <|end_header_id|>."""
        starts = []
        for row in ids:
            ends = (row == self.end_header_id).nonzero().flatten()
            # the assistant header is missing when a long prompt was truncated: then, like diffusers,
            # take the sequence end as the assistant start, which drops the last 4 tokens
            starts.append(int(ends[-1]) + 1 if len(ends) == self.layout.num_end_headers else row.shape[0])
        return starts

    def _crop(self, seq, mask, starts: list[int], image_rows):
        """Text-indexed seq [B, Lt, ...] (shifted by n_img - 1 after the image, if expanded) -> kept rows.

        image_rows [B, n_img, ...]: the image-token rows to put first (every interleave-th kept).
        Returns (seq [B, L, ...], mask [B, L]).
        """
        import torch  # local: the torch extra, for the real encoder only

        shift = seq.shape[1] - mask.shape[1]  # n_img - 1 for the expanded hidden states, else 0
        c = self.layout.crop_start
        out, out_mask = [], []
        for i, start in enumerate(starts):
            cut0 = start - ASSISTANT_HEADER_LEN
            image = image_rows[i, :: self.image_embed_interleave]
            out.append(torch.cat([image, seq[i, c + shift:cut0 + shift], seq[i, start + shift:]]))
            out_mask.append(torch.cat([torch.ones(len(image), dtype=mask.dtype), mask[i, c:cut0], mask[i, start:]]))
        return torch.stack(out), torch.stack(out_mask)

    def kept_token_ids(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The token ids behind each row of `encode`'s prompt_embeds (image slots hold the image
        token id), with the mask: (ids [B, L] int64, mask [B, L] int32). For inspection and tests."""
        import torch  # local: the torch extra, for the real encoder only

        ids, mask = self._tokenize(_as_prompts(prompts))
        image = torch.full((len(ids), self.num_image_tokens), self.image_token_id, dtype=ids.dtype)
        kept, kept_mask = self._crop(ids, mask, self._assistant_starts(ids), image)
        return kept.numpy(), kept_mask.numpy().astype(np.int32)

    def _encode_batch(self, prompts: list[str], ids, mask, images: list[np.ndarray]) -> TextConditioning:
        import torch  # local: the torch extra, for the real encoder only

        device, p, n_img = self.llava.device, self.layout.image_pos, self.num_image_tokens
        # Each <image> becomes n_img slots that LLaVA fills with projected vision features.
        img_ids = torch.full((len(prompts), n_img), self.image_token_id, dtype=ids.dtype)
        exp_ids = torch.cat([ids[:, :p], img_ids, ids[:, p + 1:]], dim=1)
        exp_mask = torch.cat([mask[:, :p], torch.ones_like(img_ids), mask[:, p + 1:]], dim=1)
        # same position ids as diffusers (padding gets 1): padding is masked but still computed
        position_ids = (exp_mask.cumsum(-1) - 1).masked_fill(exp_mask == 0, 1)
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        with torch.no_grad():
            out = self.llava(input_ids=exp_ids.to(device), attention_mask=exp_mask.to(device),
                             position_ids=position_ids.to(device),
                             pixel_values=pixel_values.to(device, self.llava.dtype), output_hidden_states=True)
            hidden = out.hidden_states[-(self.num_hidden_layers_to_skip + 1)].float().cpu()
            pooled = self._clip_pooled(prompts)
        embeds, kept_mask = self._crop(hidden, mask, self._assistant_starts(ids), hidden[:, p:p + n_img])
        return TextConditioning(embeds.numpy(), kept_mask.numpy().astype(np.int32), pooled)

    def _clip_pooled(self, prompts: list[str]) -> np.ndarray:
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True,
                                  return_tensors="pt").input_ids
        return self.clip(ids.to(self.clip.device)).pooler_output.float().cpu().numpy()

    __call__ = encode


# --------------------------------------------------------------------------------------------
# Tiny deterministic encoder
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")
_WORD_CHAR = re.compile(r"\w")  # a _WORD token starting with one is a word, else punctuation
_EOS = "\x00eos"  # not producible by _WORD, so it never collides with a prompt word


def prompt_words(prompt: str) -> list[str]:
    """The words of `prompt` as `TinyTextEncoder.encode` splits it (lower-cased), punctuation
    left out, in order, repeats kept: "A person, nodding." -> ["a", "person", "nodding"]."""
    return [w for w in _WORD.findall(prompt.lower()) if _WORD_CHAR.match(w)]


def unknown_words(prompt: str, vocabulary: Iterable[str]) -> list[str]:
    """The words of `prompt` (`prompt_words`) not in `vocabulary` (compared lower-cased), in order
    of first appearance, each once. An empty vocabulary means "no check": returns []."""
    known = {w.lower() for w in vocabulary}
    if not known:
        return []
    return list(dict.fromkeys(w for w in prompt_words(prompt) if w not in known))


def _seed(*parts: str | int) -> int:
    # blake2b, not hash(): Python's str hash is salted per process
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class TinyTextEncoder:
    """Deterministic stand-in for `HunyuanTextEncoder`: same interface, no weights.

    A prompt is lower-cased and split into words and punctuation; each gets a fixed unit-variance
    vector seeded by a hash of the word, plus a sinusoidal position code, then an end token
    (so even "" has a real token). With `images`, `num_image_tokens` tokens from a fixed random
    projection of the 8x8-downsampled portrait go first, as in HunyuanVideo. Rows hold real tokens
    then padding; L = num_image_tokens + max_length. Text over max_length - 1 words is truncated.
    pooled [B, P] = fixed random projection of the mean text-token vector (text only, like CLIP).

    A word's vector means something to a model only if the word was in its training prompts:
    `vocabulary` (those words; config `prepare.text_vocabulary`) lets `unknown_words` name the
    words of a prompt the model has never seen. Without it every word counts as known.
    """

    def __init__(self, dim: int, pooled_dim: int, max_length: int, *, num_image_tokens: int = 4, seed: int = 0,
                 vocabulary: Iterable[str] | None = None):
        if dim < 1 or pooled_dim < 1 or max_length < 1 or num_image_tokens < 0:
            raise ValueError(f"need dim, pooled_dim, max_length >= 1 and num_image_tokens >= 0; got "
                             f"{dim}, {pooled_dim}, {max_length}, {num_image_tokens}.")
        words = () if vocabulary is None else vocabulary
        words = None if isinstance(words, str) else tuple(words)  # a bare string would be read letter by letter
        if words is None or not all(isinstance(w, str) for w in words):
            raise ValueError(f"vocabulary must be an iterable of words (strings), e.g. ('a', 'person'); "
                             f"got {vocabulary!r}.")
        # lower-cased like the prompts; () or None: no vocabulary, nothing is reported unknown
        self.vocabulary = frozenset(w.lower() for w in words)
        self.dim, self.pooled_dim, self.max_length = dim, pooled_dim, max_length
        self.num_image_tokens, self.seed = num_image_tokens, seed
        self.seq_len = num_image_tokens + max_length
        rng = np.random.default_rng(_seed("tiny-text-encoder", seed))
        self._pool_proj = rng.standard_normal((dim, pooled_dim)).astype(np.float32) / math.sqrt(dim)
        image_proj = rng.standard_normal((num_image_tokens, 8 * 8 * 3, dim)).astype(np.float32)
        self._image_proj = image_proj / math.sqrt(8 * 8 * 3)
        pos = np.arange(max_length)[:, None] / (10000.0 ** (np.arange(0, dim, 2) / dim))[None]
        self._pos = np.zeros((max_length, dim), np.float32)
        self._pos[:, 0::2], self._pos[:, 1::2] = np.sin(pos), np.cos(pos[:, : dim // 2])
        self._cache: dict[str, np.ndarray] = {}

    def _word(self, word: str) -> np.ndarray:
        if word not in self._cache:
            rng = np.random.default_rng(_seed(self.seed, word))
            self._cache[word] = rng.standard_normal(self.dim).astype(np.float32)
        return self._cache[word]

    def _image_tokens(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> [num_image_tokens, D]: 8x8 block means, projected."""
        x = image.astype(np.float64) / 127.5 - 1.0
        h, w = x.shape[:2]
        integral = np.zeros((h + 1, w + 1, 3))
        integral[1:, 1:] = x.cumsum(0).cumsum(1)
        # 8 bins per axis; each at least one pixel wide, so tiny images work too
        r0, c0 = np.arange(8) * h // 8, np.arange(8) * w // 8
        r1, c1 = np.maximum((np.arange(1, 9) * h) // 8, r0 + 1), np.maximum((np.arange(1, 9) * w) // 8, c0 + 1)
        sums = integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
        small = sums / ((r1 - r0)[:, None, None] * (c1 - c0)[None, :, None])
        return np.einsum("f,nfd->nd", small.reshape(-1).astype(np.float32), self._image_proj)

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` (split as `encode` splits it, lower-cased, punctuation ignored)
        that are not in the vocabulary, in order of first appearance, each once. Empty when the
        encoder has no vocabulary."""
        return unknown_words(prompt, self.vocabulary)

    def encode(self, prompts: str | Sequence[str], images=None) -> TextConditioning:
        """prompts: str or B strings; images: optional B portraits (see `_as_images`)."""
        prompts = _as_prompts(prompts)
        images = None if images is None or self.num_image_tokens == 0 else _as_images(images, len(prompts))
        embeds = np.zeros((len(prompts), self.seq_len, self.dim), np.float32)
        mask = np.zeros((len(prompts), self.seq_len), np.int32)
        pooled = np.zeros((len(prompts), self.pooled_dim), np.float32)
        for b, prompt in enumerate(prompts):
            words = _WORD.findall(prompt.lower())[: self.max_length - 1] + [_EOS]
            text = np.stack([self._word(w) for w in words]) + self._pos[: len(words)]
            img = self._image_tokens(images[b]) if images is not None else np.zeros((0, self.dim), np.float32)
            n = len(img) + len(text)
            embeds[b, :n] = np.concatenate([img, text])
            mask[b, :n] = 1
            pooled[b] = text.mean(0) @ self._pool_proj
        return TextConditioning(embeds, mask, pooled)

    __call__ = encode
