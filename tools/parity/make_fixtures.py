#!/usr/bin/env python3
"""Generate the Python-side parity fixtures for the Rust `ril` model crate.

Everything is built from random initialisation / trained in code: nothing is downloaded.
Run with the pinned venv (see tools/README.md):

    python tools/parity/make_fixtures.py            # writes model/tests/fixtures/
    python tools/parity/make_fixtures.py --out DIR  # writes elsewhere

Outputs (relative to the fixtures dir):
  llava_llama/    tiny LLaVA (CLIP vision + Llama text) + parity.safetensors
  llava_qwen2/    tiny LLaVA (CLIP vision + Qwen2 text, tied lm head, feature layers list, "full") + parity
  tokenizer_chatml/, tokenizer_llava/   byte-level BPE tokenizer with two chat templates
  chat_cases.json                       apply_chat_template / encode expectations
  image_preproc/                        images + CLIP preprocessor config + expected pixel values
The script is deterministic (fixed seeds, CPU, float32, single thread).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "model" / "tests" / "fixtures"

SEED = 20240607


def log(*a):
    print(*a, flush=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


def save_st(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a safetensors file byte-for-byte deterministically.

    `safetensors.save_file` stores `__metadata__` through a Rust HashMap, so its key order (and thus the
    file bytes) changes from run to run. This writer sorts everything; the result is a standard safetensors file
    (little-endian, row-major, header padded with spaces to a multiple of 8) and is read back with
    `safetensors.torch.load_file` to check it.
    """
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if sys.byteorder != "little":
            raise RuntimeError("big-endian hosts are not supported")
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=False, ensure_ascii=True).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for b in blobs:
            f.write(b)
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v.detach().cpu()), k


def clean_dir(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# --------------------------------------------------------------------------------------------
# 1/2. Tiny LLaVA models + logits parity
# --------------------------------------------------------------------------------------------

IMAGE_TOKEN = 127
TEXT_VOCAB = 128
PAD_ID = 0


@torch.no_grad()
def reinit_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Large-ish random weights so logits are far from uniform and mistakes show up.

    * 1-D `weight` of LayerNorm / RMSNorm  -> 1 + 0.1 * N(0,1)
    * every bias                           -> 0.1 * N(0,1)
    * everything else (linear, conv, embeddings, class embedding) -> 0.2 * N(0,1)
    Parameters are visited in `named_parameters()` order (tied params only once).
    """
    norm_types = (torch.nn.LayerNorm,)
    norm_param_ids = set()
    for mod in model.modules():
        is_norm = isinstance(mod, norm_types) or type(mod).__name__.endswith("RMSNorm")
        if is_norm and getattr(mod, "weight", None) is not None:
            norm_param_ids.add(id(mod.weight))
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if id(p) in norm_param_ids:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.2 * noise)


def make_sequences(n_img_tokens: int, gen: torch.Generator):
    """Two sequences of equal length T; seq 1 is left padded with 3 pads.

    seq0: 4 text, n_img image tokens, 8 text                  -> T = n_img + 12
    seq1: 3 pads, 3 text, n_img image tokens, 6 text           -> T = n_img + 12
    Text ids are drawn from [1, 126] (0 = pad, 127 = image token).
    """

    def text(n):
        return torch.randint(1, IMAGE_TOKEN, (n,), generator=gen).tolist()

    img = [IMAGE_TOKEN] * n_img_tokens
    s0 = text(4) + img + text(8)
    s1 = [PAD_ID] * 3 + text(3) + img + text(6)
    assert len(s0) == len(s1)
    input_ids = torch.tensor([s0, s1], dtype=torch.int64)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    # Same as transformers' GenerationMixin._prepare_position_ids... / prepare_inputs_for_generation
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(attention_mask == 0, 1)
    return input_ids, attention_mask, position_ids


def build_llava(kind: str) -> tuple[LlavaConfig, int]:
    if kind == "llama":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=TEXT_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=16,
            tie_word_embeddings=False,
        )
        n_img = (16 // 4) ** 2  # default strategy drops CLS
    elif kind == "qwen2":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=32,
        )
        text = Qwen2Config(
            vocab_size=TEXT_VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            hidden_act="silu",
            use_sliding_window=False,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=[-3, -1],
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
            image_seq_length=17,
        )
        n_img = (16 // 4) ** 2 + 1  # full strategy keeps CLS
    else:
        raise ValueError(kind)
    return cfg, n_img


@torch.no_grad()
def make_llava_fixture(out: Path, kind: str, seed: int) -> dict:
    d = clean_dir(out / f"llava_{kind}")
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg, n_img = build_llava(kind)
    model = LlavaForConditionalGeneration(cfg).to(torch.float32)
    reinit_weights(model, gen)
    model.eval()

    input_ids, attention_mask, position_ids = make_sequences(n_img, gen)
    pixel_values = torch.randn((2, 3, 16, 16), generator=gen, dtype=torch.float32)

    # Reference run with the eager attention implementation (explicit additive mask).
    model.set_attn_implementation("eager")
    out_eager = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        use_cache=False,
    )
    logits = out_eager.logits.float().contiguous()
    image_hidden = out_eager.image_hidden_states
    # Cross-check against sdpa on the positions that matter (non-pad).
    model.set_attn_implementation("sdpa")
    out_sdpa = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        use_cache=False,
    )
    valid = attention_mask.bool()
    diff = (out_sdpa.logits[valid] - logits[valid]).abs().max().item()
    log(f"[llava_{kind}] eager vs sdpa max |diff| on non-pad positions: {diff:.3e}")
    assert diff < 1e-4, diff
    model.set_attn_implementation("eager")

    # Sanity: the logits are not near uniform, and the image actually matters.
    probs = logits[valid].softmax(-1)
    max_p = probs.max(-1).values
    log(
        f"[llava_{kind}] logits std {logits[valid].std().item():.3f}, "
        f"mean max-prob {max_p.mean().item():.3f} (uniform would be {1 / TEXT_VOCAB:.4f})"
    )
    out_other = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values.flip(0),
        use_cache=False,
    )
    img_effect = (out_other.logits[valid] - logits[valid]).abs().max().item()
    log(f"[llava_{kind}] max |logit change| when swapping the two images: {img_effect:.3f}")
    assert img_effect > 1e-2

    # Independent re-derivation of the pipeline from the parts, pinning down the semantics the Rust side relies on:
    #  * vision hidden_states[0] = pre_layrnorm(embeddings(pixels)), hidden_states[i] = output of encoder layer i-1
    #  * feature layers are indexed into that tuple (negative = from the end), concatenated along hidden,
    #    CLS dropped per layer for "default"; post_layernorm is NOT applied
    #  * projected features are scattered (row-major over batch, then sequence) into the image-token positions
    lm = model.model
    vt = lm.vision_tower(pixel_values, output_hidden_states=True)
    hs = vt.hidden_states
    assert len(hs) == cfg.vision_config.num_hidden_layers + 1
    emb0 = lm.vision_tower.pre_layrnorm(lm.vision_tower.embeddings(pixel_values))
    assert torch.equal(hs[0], emb0)
    assert torch.equal(hs[-1], vt.last_hidden_state)
    layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else list(cfg.vision_feature_layer)
    sel = [hs[i] for i in layers]
    if cfg.vision_feature_select_strategy == "default":
        sel = [h[:, 1:] for h in sel]
    selected = torch.cat(sel, dim=-1)
    projected = lm.multi_modal_projector(selected)
    assert projected.shape[1] == n_img
    assert torch.allclose(projected.reshape(-1, projected.shape[-1]), image_hidden, atol=1e-6)
    merged = lm.language_model.embed_tokens(input_ids).clone()
    merged[input_ids == IMAGE_TOKEN] = projected.reshape(-1, projected.shape[-1])
    lm_out = lm.language_model(inputs_embeds=merged, attention_mask=attention_mask, position_ids=position_ids)
    manual_logits = model.lm_head(lm_out.last_hidden_state)
    md = (manual_logits[valid] - logits[valid]).abs().max().item()
    log(f"[llava_{kind}] manual pipeline vs forward max |diff|: {md:.3e}")
    assert md < 1e-5, md
    extra = {f"vision_hidden_states.{i}": h.float().contiguous() for i, h in enumerate(hs)}
    extra["vision_selected_features"] = selected.float().contiguous()
    extra["inputs_embeds_merged"] = merged.float().contiguous()

    # Save the model with transformers' own writer.
    model.save_pretrained(d, safe_serialization=True)
    save_st(
        {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "position_ids": position_ids.contiguous(),
            "pixel_values": pixel_values.contiguous(),
            "logits": logits,
            # Projected image features (after projector), [2 * n_img, hidden] in masked_scatter order.
            "image_features": image_hidden.float().contiguous(),
            **extra,
        },
        str(d / "parity.safetensors"),
        metadata={
            "generator": "tools/parity/make_fixtures.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "attn_implementation": "eager",
            "note": "logits at attention_mask==0 positions are implementation-defined; compare only mask==1",
        },
    )

    # Reload round trip: the saved checkpoint must reproduce the logits.
    reloaded = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    out_re = reloaded(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        use_cache=False,
    )
    rt = (out_re.logits[valid] - logits[valid]).abs().max().item()
    log(f"[llava_{kind}] reload round-trip max |diff|: {rt:.3e}")
    assert rt < 1e-5, rt

    saved_cfg = json.loads((d / "config.json").read_text())
    keys = sorted(load_file(str(d / "model.safetensors")).keys())
    info = {
        "n_image_tokens_per_image": n_img,
        "T": int(input_ids.shape[1]),
        "saved_tie_word_embeddings": saved_cfg.get("tie_word_embeddings"),
        "saved_text_tie_word_embeddings": saved_cfg.get("text_config", {}).get("tie_word_embeddings"),
        "has_lm_head_key": any("lm_head" in k for k in keys),
        "num_keys": len(keys),
        "key_sample": [k for k in keys if ".layers.0." not in k and ".layers.1." not in k and ".layers.2." not in k],
    }
    log(f"[llava_{kind}] config tie_word_embeddings={info['saved_tie_word_embeddings']} "
        f"text_config.tie_word_embeddings={info['saved_text_tie_word_embeddings']} "
        f"lm_head in safetensors={info['has_lm_head_key']}")
    log(f"[llava_{kind}] non-layer keys: {info['key_sample']}")
    log(f"[llava_{kind}] layer-0 keys: {[k for k in keys if '.layers.0.' in k]}")
    return info


# --------------------------------------------------------------------------------------------
# 3. Tokenizer + chat templates
# --------------------------------------------------------------------------------------------

CORPUS = """\
What shape is this? It is a circle.
What colour is the square? The square is red.
How many triangles are there? There are three triangles.
Is the circle bigger than the square? Yes, the circle is bigger than the square.
Describe the image. The image shows a blue circle next to a green triangle.
What is the colour of the background? The background is white.
Which shape is on the left? The red square is on the left.
Are there any stars? No, there are no stars in the image.
Count the circles. There are two circles: one yellow and one purple.
What colour is the triangle? The triangle is green.
Is the rectangle horizontal or vertical? The rectangle is horizontal.
Name all the colours you can see: red, green, blue, yellow, orange, purple, black and white.
The hexagon has six sides and the pentagon has five sides.
A square has four equal sides; a rectangle has two pairs of equal sides.
You are a helpful assistant. Answer questions about shapes and colours.
What is in the picture? A small orange star above a large grey circle.
Please describe the shapes briefly. Two squares, one circle, and a diamond.
Thank you! You're welcome.
The café sign is a red circle ≥ 3 metres wide ✓.
Is 3 ≥ 2? Yes. Is the colour grey or gray? Both spellings are fine.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<s>", "</s>"]

# Qwen2's pre-tokenization regex (GPT-4 style, digits split one by one).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = """\
{%- set ns = namespace(images=0) -%}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}
{{ message['content'].strip() }}<|im_end|>
{% else %}
    {% for part in message['content'] %}
        {% if part['type'] == 'image' or 'image' in part %}
            {% set ns.images = ns.images + 1 %}
<image>{% if not loop.last %}{{ '\\n' }}{% endif %}
        {% elif part['type'] == 'text' %}
{{ part['text'].strip() }}{% if not loop.last %}{{ '\\n' }}{% endif %}
        {% endif %}
    {% endfor %}
<|im_end|>
{% endif %}
    {% if loop.last and add_generation_prompt %}
<|im_start|>assistant
    {% endif %}
{% endfor %}
"""

LLAVA_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
        {%- set n_images = 0 -%}
    {%- else -%}
        {%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
        {%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- text.strip() + '\\n\\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' + ('<image>\\n' * n_images) + text.strip() + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' + text.strip() + eos_token -}}
    {%- else -%}
        {{- raise_exception('Only system, user and assistant roles are supported, got ' + message['role'].upper()) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""


def train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def save_hf_tokenizer(tok, d: Path, flavour: str):
    from tokenizers import processors

    tok = tok.__class__.from_str(tok.to_str())  # copy
    if flavour == "chatml":
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            extra_special_tokens={"image_token": "<image>"},
            model_max_length=4096,
            padding_side="left",
            clean_up_tokenization_spaces=False,
        )
        hf.chat_template = CHATML_TEMPLATE
    else:
        # LLaVA-1.5 (Llama) style: the post-processor prepends BOS when add_special_tokens=True.
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<|endoftext|>",
            unk_token=None,
            extra_special_tokens={"image_token": "<image>"},
            model_max_length=4096,
            padding_side="left",
            clean_up_tokenization_spaces=False,
        )
        hf.chat_template = LLAVA_TEMPLATE
    clean_dir(d)
    hf.save_pretrained(d)
    return hf


def flat_ids(x):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers v5 (return_dict=True default)."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


JINJA_ENV_CASES = [
    # (name, template, context)
    ("tojson_default", "{{ x | tojson }}",
     {"x": {"b": 1, "a": "café <tag> & 'q' \"dq\"", "list": [1, 2.5, True, None]}}),
    ("tojson_indent", "{{ x | tojson(indent=2) }}", {"x": {"z": [1, {"y": "é"}], "a": None}}),
    ("trim_and_lstrip_blocks", "  {% if true %}\nyes\n  {% endif %}\nend\n", {}),
    ("trailing_newline_dropped", "a\n\n", {}),
    ("whitespace_control_minus", "a  {%- if true -%}  b  {%- endif -%}  c", {}),
    ("python_str_methods",
     "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.upper() }}|{{ s.lower() }}|"
     "{{ s.startswith(' ') }}|{{ s.strip().endswith('b') }}|{{ s.replace('a', 'x') }}|"
     "{{ s.split(',') | join('/') }}|{{ s | trim }}",
     {"s": "  a,b  "}),
    ("loop_variables",
     "{% for x in xs %}{{ loop.index0 }}{{ loop.index }} {{ loop.first }} {{ loop.last }} {{ loop.length }};{% endfor %}",
     {"xs": ["p", "q", "r"]}),
    ("namespace_accumulate",
     "{% set ns = namespace(n=0, seen=false) %}{% for x in xs %}{% set ns.n = ns.n + x %}"
     "{% if x > 1 %}{% set ns.seen = true %}{% endif %}{% endfor %}{{ ns.n }} {{ ns.seen }}",
     {"xs": [1, 2, 3]}),
    ("tests_and_filters",
     "{{ a is defined }} {{ nope is defined }} {{ n is none }} {{ s is string }} {{ xs is iterable }} "
     "{{ xs | length }} {{ xs | first }} {{ xs | last }} {{ s | length }} {{ 'k' in d }} {{ d['k'] }} {{ d.k }}",
     {"a": 1, "n": None, "s": "héllo", "xs": [3, 4], "d": {"k": "v"}}),
    ("selectattr_map",
     "{{ parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' + ') }} "
     "{{ parts | selectattr('type', 'equalto', 'image') | list | length }}",
     {"parts": [{"type": "image"}, {"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}),
    ("dict_items_loop", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", {"d": {"b": 2, "a": 1}}),
    ("render_bool_none_int_float", "{{ t }} {{ f }} {{ n }} {{ i }} {{ fl }} {{ 7 // 2 }} {{ 7 / 2 }} {{ 2 ** 3 }}",
     {"t": True, "f": False, "n": None, "i": 3, "fl": 2.5}),
    ("string_concat_and_repeat", "{{ 'ab' + 'cd' }} {{ 'ab' ~ 1 }} {{ '<x>' * 3 }}", {}),
]


def make_jinja_env_cases() -> list:
    """Small templates rendered with transformers' own chat-template environment (same compile function)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    cases = []
    for name, tpl, ctx in JINJA_ENV_CASES:
        outp = _compile_jinja_template(tpl).render(**ctx)
        cases.append({"name": name, "template": tpl, "context": ctx, "output": outp})
        log(f"[jinja] {name}: {json.dumps(outp, ensure_ascii=False)}")
    return cases


def make_tokenizer_fixtures(out: Path) -> dict:
    from transformers import AutoTokenizer

    base = train_tokenizer()
    log(f"[tokenizer] trained vocab size {base.get_vocab_size()}")
    dirs = {"tokenizer_chatml": "chatml", "tokenizer_llava": "llava"}
    toks = {}
    for name, flavour in dirs.items():
        save_hf_tokenizer(base, out / name, flavour)
        # Always use the reloaded tokenizer, exactly as a consumer of the files would.
        toks[name] = AutoTokenizer.from_pretrained(out / name)
        log(f"[tokenizer] {name}: files {sorted(os.listdir(out / name))}; class {type(toks[name]).__name__}")

    img = {"type": "image"}

    def txt(s):
        return {"type": "text", "text": s}

    cases_spec = [
        # ---- ChatML ----
        ("chatml_single_turn_image", "tokenizer_chatml",
         [{"role": "user", "content": [img, txt("What shape is this?")]}], True),
        ("chatml_string_content_no_gen_prompt", "tokenizer_chatml",
         [{"role": "user", "content": "  What colour is the square?  "}], False),
        ("chatml_system_multi_turn", "tokenizer_chatml",
         [
             {"role": "system", "content": "You are a helpful assistant. Answer questions about shapes."},
             {"role": "user", "content": [txt("Describe the image."), img]},
             {"role": "assistant", "content": "The image shows a blue circle."},
             {"role": "user", "content": [txt("How many triangles are there?")]},
         ], True),
        ("chatml_multi_turn_list_content_with_answer", "tokenizer_chatml",
         [
             {"role": "user", "content": [img, img, txt("Which image has the red square?")]},
             {"role": "assistant", "content": [txt("The second one.")]},
         ], False),
        # Special-token strings inside user content are encoded as the special tokens (sanitize_control_tokens=False).
        ("chatml_special_token_strings_in_content", "tokenizer_chatml",
         [{"role": "user", "content": "hi <image> <|im_end|> there"}], True),
        ("chatml_non_ascii", "tokenizer_chatml",
         [{"role": "user", "content": [img, txt("café ≥ 3 ✓ — is the sign round?")]}], True),
        # ---- LLaVA-1.5 ----
        ("llava_single_turn_image", "tokenizer_llava",
         [{"role": "user", "content": [img, txt("What is in the picture?")]}], True),
        ("llava_string_content", "tokenizer_llava",
         [{"role": "user", "content": "Is the circle bigger than the square?"}], True),
        ("llava_system_multi_turn", "tokenizer_llava",
         [
             {"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": [img, txt("What colour is the triangle?")]},
             {"role": "assistant", "content": [txt("The triangle is green.")]},
             {"role": "user", "content": [txt("And the square?")]},
         ], True),
        ("llava_no_gen_prompt_non_ascii", "tokenizer_llava",
         [
             {"role": "user", "content": [img, txt("café ≥ 3 ✓")]},
             {"role": "assistant", "content": "Yes ✓"},
         ], False),
    ]

    cases = []
    for name, tdir, messages, agp in cases_spec:
        tk = toks[tdir]
        text = tk.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False)
        ids_raw = tk.apply_chat_template(messages, add_generation_prompt=agp, tokenize=True)
        ids = flat_ids(ids_raw)
        enc_false = tk(text, add_special_tokens=False).input_ids
        enc_true = tk(text, add_special_tokens=True).input_ids
        assert ids == enc_false, (name, ids, enc_false)
        decoded = tk.decode(ids, skip_special_tokens=False)
        assert decoded == text, (name, decoded, text)
        cases.append(
            {
                "name": name,
                "tokenizer_dir": tdir,
                "messages": messages,
                "add_generation_prompt": agp,
                "text": text,
                "ids": ids,
                "encode_add_special_tokens_false_ids": list(enc_false),
                "encode_add_special_tokens_true_ids": list(enc_true),
                "decode_skip_special_tokens": tk.decode(ids, skip_special_tokens=True),
            }
        )
        log(f"[chat] {name}: {len(ids)} ids; apply_chat_template(tokenize=True) returned {type(ids_raw).__name__}")
        log("       text=" + json.dumps(text, ensure_ascii=False))

    # Bad role must raise through raise_exception (jinja2 TemplateError).
    errors = []
    for tdir in dirs:
        try:
            toks[tdir].apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)
            raise AssertionError("expected an exception for a bad role")
        except Exception as e:  # jinja2.exceptions.TemplateError
            errors.append({"tokenizer_dir": tdir, "messages": [{"role": "robot", "content": "hi"}],
                           "error_type": type(e).__name__, "message": str(e)})
            log(f"[chat] {tdir}: bad role -> {type(e).__name__}: {e}")

    special_ids = {}
    for tdir, tk in toks.items():
        m = {t: tk.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        m.update({
            "bos_token": tk.bos_token, "bos_token_id": tk.bos_token_id,
            "eos_token": tk.eos_token, "eos_token_id": tk.eos_token_id,
            "pad_token": tk.pad_token, "pad_token_id": tk.pad_token_id,
        })
        special_ids[tdir] = m

    # Plain encode cases (no template), to pin down the pre-tokenizer / BPE merges.
    plain_texts = [
        "What shape is this?",
        "The café sign is ≥ 3 metres ✓",
        "  leading and trailing spaces  ",
        "digits 12345 and newline\n\nend",
        "<|im_start|>user\n<image>\nhi<|im_end|>",
        "tab\tseparated\tWORDS, CAPS and émojis 🙂",
    ]
    tk = toks["tokenizer_chatml"]
    plain = [{"text": t, "ids": tk(t, add_special_tokens=False).input_ids,
              "tokens": tk.convert_ids_to_tokens(tk(t, add_special_tokens=False).input_ids)} for t in plain_texts]

    jinja_cases = make_jinja_env_cases()

    doc = {
        "generator": "tools/parity/make_fixtures.py",
        "transformers": transformers.__version__,
        "special_ids": special_ids,
        "cases": cases,
        "error_cases": errors,
        "plain_encode_cases_tokenizer_chatml": plain,
        "jinja_env_cases": jinja_cases,
    }
    (out / "chat_cases.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {"special_ids": special_ids, "n_cases": len(cases)}


# --------------------------------------------------------------------------------------------
# 4. Image preprocessing
# --------------------------------------------------------------------------------------------


def make_images(gen: np.random.Generator):
    from PIL import Image

    def smooth_rgb(h, w, c):
        # Gradient + noise so resampling differences are visible.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(h + w - 2, 1)], -1) * 200
        img = base[..., :c] if c <= 3 else np.concatenate([base, base[..., :1]], -1)
        img = img + gen.normal(0, 30, size=(h, w, c))
        return np.clip(img, 0, 255).astype(np.uint8)

    images = {}
    # 16x16 RGB PNG
    images["rgb_16x16.png"] = (Image.fromarray(smooth_rgb(16, 16, 3), "RGB"), "PNG", {})
    # 40x30 (w x h) RGBA PNG, alpha varying from 0 to 255 across the image
    rgba = smooth_rgb(30, 40, 4)
    rgba[..., 3] = np.clip(np.linspace(0, 255, 40)[None, :] + gen.normal(0, 10, size=(30, 40)), 0, 255).astype(np.uint8)
    images["rgba_40x30.png"] = (Image.fromarray(rgba, "RGBA"), "PNG", {})
    # 30x50 (w x h) JPEG q95, 4:4:4 (no chroma subsampling, to limit decoder-dependent upsampling differences)
    images["rgb_30x50.jpg"] = (Image.fromarray(smooth_rgb(50, 30, 3), "RGB"), "JPEG", {"quality": 95, "subsampling": 0})
    # 24x24 grayscale PNG
    images["gray_24x24.png"] = (Image.fromarray(smooth_rgb(24, 24, 1)[..., 0], "L"), "PNG", {})
    return images


def make_image_fixtures(out: Path) -> dict:
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb, get_resize_output_image_size
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    d = clean_dir(out / "image_preproc")
    gen = np.random.default_rng(SEED)
    images = make_images(gen)

    proc = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 16},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 16, "width": 16},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    proc.save_pretrained(d)

    pixel = {}
    inter = {}
    info = {}
    for fname, (im, fmt, kw) in images.items():
        path = d / fname
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        path.write_bytes(buf.getvalue())
        # Read back from disk exactly as a user would.
        loaded = Image.open(path)
        loaded.load()
        pv = proc(images=loaded, return_tensors="pt")["pixel_values"]
        assert pv.shape == (1, 3, 16, 16), pv.shape
        pixel[fname] = pv[0].float().contiguous()

        # Intermediates (to debug a mismatch stage by stage): decoded RGB after convert_rgb, and the
        # uint8 image after the PIL bicubic resize (before center crop), both HWC uint8.
        rgb = convert_to_rgb(Image.open(path), return_numpy=True)
        h, w = rgb.shape[:2]
        nh, nw = get_resize_output_image_size(rgb, size=16, default_to_square=False, input_data_format="channels_last")
        resized = np.array(Image.fromarray(rgb).resize((nw, nh), resample=Image.Resampling.BICUBIC))
        top, left = (nh - 16) // 2, (nw - 16) // 2
        crop = resized[top:top + 16, left:left + 16]
        # Re-derive pixel values independently to document the math exactly.
        mean = np.array(proc.image_mean, dtype=np.float32)
        std = np.array(proc.image_std, dtype=np.float32)
        manual = ((crop.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
        manual = torch.from_numpy(np.ascontiguousarray(manual.transpose(2, 0, 1)))
        md = (manual - pixel[fname]).abs().max().item()
        assert md < 1e-6, (fname, md)
        inter[f"{fname}/decoded_rgb_hwc_u8"] = torch.from_numpy(np.ascontiguousarray(rgb))
        inter[f"{fname}/resized_rgb_hwc_u8"] = torch.from_numpy(np.ascontiguousarray(resized))
        info[fname] = {"mode": loaded.mode, "size_wh": list(loaded.size), "resized_hw": [nh, nw],
                       "crop_top_left": [top, left]}
        log(f"[image] {fname}: mode {loaded.mode} size(w,h)={loaded.size} -> resize (h,w)=({nh},{nw}) "
            f"-> crop top={top} left={left}; manual re-derivation max |diff| {md:.2e}")

    save_st(pixel, str(d / "pixel_values.safetensors"),
              metadata={"generator": "tools/parity/make_fixtures.py", "processor": "CLIPImageProcessorPil",
                        "transformers": transformers.__version__})
    save_st(inter, str(d / "intermediates.safetensors"),
              metadata={"generator": "tools/parity/make_fixtures.py"})
    (d / "images.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# --------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    if transformers.__version__ != "5.23.0" or not torch.__version__.startswith("2.15.0"):
        log(f"WARNING: fixtures are pinned to transformers 5.23.0 / torch 2.15.0, running "
            f"{transformers.__version__} / {torch.__version__}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    make_llava_fixture(out, "llama", SEED + 1)
    make_llava_fixture(out, "qwen2", SEED + 2)
    make_tokenizer_fixtures(out)
    make_image_fixtures(out)

    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")
    log(f"total {total} bytes")
    assert total < 2_000_000, total


if __name__ == "__main__":
    sys.exit(main())
