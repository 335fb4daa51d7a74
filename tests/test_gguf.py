"""GGUF loading: a tiny GGUF written here with the `gguf` package, and the real demo model.

The tiny file is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: Q/K rows
permuted per head into llama.cpp's rotary layout (`LlamaModel.permute`; K with the KV head
count), a gpt2-style byte-level BPE vocabulary with merges, control tokens and a chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distspec.models.llama import Transformer
from tiny import CHAT_TEMPLATE, EOS_ID, SPECIALS, make_tiny_model_dir, perturb_weights

MERGES = ["h e", "l l", "he ll", "hell o"]
MERGED = ["he", "ll", "hell", "hello"]
VOCAB = 256 + len(SPECIALS) + len(MERGED)  # bytes, then specials (256..260), then merged tokens
TOKEN_ID = {t: 256 + len(SPECIALS) + i for i, t in enumerate(MERGED)}
BOS_ID = 256
N_HEADS, N_KV_HEADS = 4, 2
ATOL = 1e-4


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head: query heads for Q, KV heads for K)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # byte -> printable char, GPT-2's byte-level alphabet
    return [byte_chars[b] for b in range(256)] + SPECIALS + MERGED


def write_tiny_gguf(hf_model, path: Path, *, f16_matrices: bool) -> None:
    """Write hf_model (a LlamaForCausalLM) as a llama-architecture GGUF file."""
    import gguf

    cfg = hf_model.config
    tokens = gguf_tokens()
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16_matrices else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    w.add_token_types([control if t in SPECIALS else normal for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{g_name}.weight"
    sd = hf_model.state_dict()
    for hf_name, g_name in names.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        t = sd[hf_name].detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        if f16_matrices and t.ndim == 2:
            t = t.astype(np.float16)  # the reference model holds the same fp16-rounded values
        w.add_tensor(g_name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["untied-f32", "tied-f16"])
def tiny_gguf(request, tmp_path_factory):
    """(gguf path, reference transformers model)."""
    from transformers import AutoModelForCausalLM

    tied = request.param.startswith("tied")
    root = tmp_path_factory.mktemp("gguf")
    d = make_tiny_model_dir(
        root / "hf",
        num_heads=N_HEADS,
        num_kv_heads=N_KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
        seed=3,
    )
    perturb_weights(d, seed=4)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    f16 = request.param.endswith("f16")
    if f16:
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    path = root / "tiny-test.gguf"
    write_tiny_gguf(hf, path, f16_matrices=f16)
    return path, hf


def ids_for_test(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def test_permutation_is_inverted_exactly():
    from distspec.models.gguf_convert import _unpermute

    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for n in (1, 2, 6):
        permuted = llama_cpp_permute(w, n)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(_unpermute(permuted, n), w)


def test_gguf_config_and_state_dict(tiny_gguf):
    from gguf import GGUFReader

    from distspec.models.gguf_convert import gguf_config, gguf_state_dict

    path, hf = tiny_gguf
    reader = GGUFReader(str(path))
    cfg = gguf_config(reader)
    hcfg = hf.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == VOCAB
    assert cfg.hidden_size == hcfg.hidden_size
    assert cfg.intermediate_size == hcfg.intermediate_size
    assert cfg.num_hidden_layers == hcfg.num_hidden_layers
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (N_HEADS, N_KV_HEADS)
    assert cfg.head_dim == hcfg.hidden_size // N_HEADS
    assert cfg.max_position_embeddings == hcfg.max_position_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hcfg.rms_norm_eps)
    assert cfg.rope_theta == pytest.approx(hcfg.rope_parameters["rope_theta"])
    assert cfg.tie_word_embeddings == hcfg.tie_word_embeddings
    assert not cfg.attention_bias
    assert cfg.bos_token_id == BOS_ID and cfg.eos_token_ids == [EOS_ID]

    sd = gguf_state_dict(reader, cfg)
    ref = hf.state_dict()
    expected = set(ref) - ({"lm_head.weight"} if hcfg.tie_word_embeddings else set())
    assert set(sd) == expected
    for name, t in sd.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, ref[name], rtol=0, atol=0, msg=name)

    model = Transformer.empty(cfg)
    model.load_hf_state_dict(sd)
    model.setup_cache(1, 64)
    ids = ids_for_test()
    out = model(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(out, hf_logits(hf, ids), rtol=0, atol=ATOL)


def test_load_model_on_gguf_path(tiny_gguf, tmp_path, monkeypatch):
    import distspec.models.loader as loader

    path, hf = tiny_gguf
    monkeypatch.setenv("DISTSPEC_CACHE", str(tmp_path / "cache"))
    loaded = loader.load_model(str(path), max_len=64)
    assert loaded.path.is_relative_to(tmp_path / "cache")
    assert (loaded.path / "config.json").exists()
    ids = ids_for_test(seed=1)
    out = loaded.model(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(out, hf_logits(hf, ids), rtol=0, atol=ATOL)

    # the GGUF tokenizer (byte-level BPE with merges + control tokens) survived conversion
    tok = loaded.tokenizer
    # every GGUF token keeps its id (transformers' GPT2Tokenizer may append its default
    # "<|endoftext|>" when the vocabulary lacks it: one extra id the model never produces)
    for i, t in enumerate(gguf_tokens()):
        assert tok.backend.token_to_id(t) == i, t
    assert tok.vocab_size in (VOCAB, VOCAB + 1)
    hello, hell = TOKEN_ID["hello"], TOKEN_ID["hell"]
    assert tok.encode("hello hi") == [hello, ord(" "), ord("h"), ord("i")]
    assert tok.encode("hell") == [hell]
    assert tok.encode("<|user|>hello</s>") == [258, hello, EOS_ID]
    assert tok.decode([hello, ord(" "), ord("h"), ord("i")]) == "hello hi"
    assert tok.encode("é") == list("é".encode())
    assert EOS_ID in tok.eos_token_ids
    from distspec.models.tokenizer import ChatMessage

    chat = tok.encode_chat([ChatMessage("user", "hello")])
    assert chat == [258, hello, EOS_ID, 259]  # <|user|>hello</s><|assistant|>

    # second load: served from the cache, no re-conversion
    def no_convert(*args, **kwargs):
        raise AssertionError("converted the GGUF file twice")

    monkeypatch.setattr(loader, "convert_gguf", no_convert)
    again = loader.load_model(str(path), max_len=64)
    assert again.path == loaded.path
    out2 = again.model(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_transformers_reads_our_gguf_the_same_way(tiny_gguf):
    """Independent check of the test's own writer: transformers' GGUF loader, which undoes
    llama.cpp's permutation with its own code, reproduces the original model from the file."""
    from transformers import AutoModelForCausalLM

    path, hf = tiny_gguf
    from_gguf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = ids_for_test(seed=2)
    torch.testing.assert_close(hf_logits(from_gguf, ids), hf_logits(hf, ids), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# the real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF)

DEMO_CHAT = "Why is the sky blue during the day but red at sunset? Answer briefly."
TOKENIZER_STRINGS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "Ünïcödé: naïve café, Straße, 東京, Привет мир",
    "emojis 👍🏽🚀 and 👨‍👩‍👧 families",
    "def f(x):\n    return x ** 2  # comment\n\tif x: pass\n",
    "numbers 1234567 3.14159 -42 1e10",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.mark.slow
def test_demo_logits_match_transformers(demo_loaded, demo_hf):
    from distspec.models.loader import load_model
    from distspec.models.tokenizer import ChatMessage

    hf_model, _ = demo_hf
    ids = demo_loaded.tokenizer.encode_chat([ChatMessage("user", DEMO_CHAT)])
    assert 30 <= len(ids) <= 60
    x = torch.tensor([ids])
    ref = hf_logits(hf_model, x)[0]
    scale = ref.abs().max().item()

    unpacked = load_model("demo", max_len=256).model
    for name, model in (("packed", demo_loaded.model), ("unpacked", unpacked)):
        out = model(x, torch.arange(len(ids))[None])[0]
        diff = (out - ref).abs().max().item()
        print(f"demo {name}: {len(ids)} tokens, max |logit diff| {diff:.3g}, scale {scale:.3g}")
        assert diff < 1e-3 * scale, (name, diff, scale)
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), name


@pytest.mark.slow
def test_demo_tokenizer_matches_transformers(demo_loaded, demo_hf):
    from distspec.models.tokenizer import ChatMessage

    _, hf_tok = demo_hf
    tok = demo_loaded.tokenizer
    for text in TOKENIZER_STRINGS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids), text
        msgs = [ChatMessage("user", text)]
        expected = hf_tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(expected, dict) or hasattr(expected, "keys"):
            expected = expected["input_ids"]
        assert tok.encode_chat(msgs) == list(expected), text
    # multi-turn with a system prompt
    conv = [
        ("system", "You are terse."),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "and 3+3? 🤔"),
    ]
    expected = hf_tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in conv], add_generation_prompt=True, tokenize=True
    )
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert tok.encode_chat([ChatMessage(r, c) for r, c in conv]) == list(expected)


@pytest.mark.slow
def test_demo_int4_target_runs_the_files_blocks_and_agrees_with_transformers(demo_loaded, demo_hf):
    """--target-dtype int4 on the demo GGUF: its Q4_1 layers and Q8_0 head run as stored
    (the same values transformers dequantizes, bit for bit), so logits agree as the fp32
    target's do and greedy decoding is transformers' except where two tokens nearly tie."""
    from distspec.models.linear import QuantLinear
    from distspec.models.loader import load_model
    from distspec.models.tokenizer import ChatMessage

    hf_model, _ = demo_hf
    int4 = load_model("demo", max_len=256, weight_dtype="int4").model
    wqkv, head = int4.layers[0].attn.wqkv, int4.lm_head
    assert isinstance(wqkv, QuantLinear) and wqkv.kind == "int4" and head.kind == "int8"
    fp32 = demo_loaded.model.layers[0].attn.wqkv.weight  # the same GGUF, dequantized
    assert torch.equal(wqkv.weight.dequantize(), fp32)
    assert torch.equal(head.weight.dequantize(), demo_loaded.model.embed.weight)

    ids = demo_loaded.tokenizer.encode_chat([ChatMessage("user", DEMO_CHAT)])
    x = torch.tensor([ids])
    ref = hf_logits(hf_model, x)[0]
    out = int4(x, torch.arange(len(ids))[None])[0]
    assert (out - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
    with torch.inference_mode():
        expected = hf_model.generate(
            x, max_new_tokens=48, do_sample=False, attention_mask=torch.ones_like(x)
        )[0, len(ids) :].tolist()
    got, pos, nxt = [], len(ids), int(out[-1].argmax())
    for _ in range(48):
        got.append(nxt)
        logits = int4(torch.tensor([[nxt]]), torch.tensor([[pos]]))[0, -1]
        pos, nxt = pos + 1, int(logits.argmax())
    same = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), 48)
    if same < 48:  # a near-tie in transformers' own logits at the first difference
        seq = torch.tensor([ids + expected[:same]])
        top2 = hf_logits(hf_model, seq)[0, -1].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3 * top2[0].abs().item(), same
