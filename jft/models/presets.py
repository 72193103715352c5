"""Named model shapes, as plain data.

Each preset holds only `TransformerConfig` fields that describe a model
(shape and family traits; no dtypes, no remat), so a config can override
any of them.
The public shapes are copied from the Hugging Face `config.json` files of
the released checkpoints; their param counts are asserted in the tests.
"""


def sliding_pattern(n_layers: int, every: int) -> tuple[str, ...]:
  """Gemma's layer types: every `every`-th layer global, the rest sliding."""
  return tuple(
    "full" if (i + 1) % every == 0 else "sliding" for i in range(n_layers)
  )


# What each Hugging Face family changes from the Llama defaults (the
# TransformerConfig fields that are not shape).
FAMILY_TRAITS: dict[str, dict] = {
  "llama": dict(family="llama"),
  "mistral": dict(family="mistral"),
  "qwen2": dict(family="qwen2", qkv_bias=True),
  "qwen3": dict(family="qwen3", qk_norm=True),
  "gemma": dict(
    family="gemma",
    mlp_act="gelu_tanh",
    norm_plus_one=True,
    embed_scale=True,
    tie_embeddings=True,
  ),
  "gemma2": dict(
    family="gemma2",
    mlp_act="gelu_tanh",
    norm_plus_one=True,
    embed_scale=True,
    tie_embeddings=True,
    sandwich_norm=True,
  ),
  "gemma3": dict(
    family="gemma3",
    mlp_act="gelu_tanh",
    norm_plus_one=True,
    embed_scale=True,
    tie_embeddings=True,
    sandwich_norm=True,
    qk_norm=True,
  ),
}

_LLAMA3_ROPE = dict(
  rope_type="llama3",
  factor=32.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=8192,
)

PRESETS: dict[str, dict] = {
  # CPU test size: compiles in about a second.
  "tiny": dict(
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_dim=128,
    rope_theta=10000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=False,
  ),
  # Demo size for the pretrain -> SFT -> DPO chain on a 2-core CPU (~0.8M
  # params with the built-in tokenizer): big enough to learn the tasks.
  "mini": dict(
    vocab_size=512,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    mlp_dim=352,
    rope_theta=10000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=False,
  ),
  # Reference from-scratch pretraining size (~5M params incl. embeddings).
  "ref-5M": dict(
    vocab_size=4096,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    mlp_dim=688,
    rope_theta=10000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=False,
  ),
  # ~25M params: a single-accelerator smoke-test size.
  "small": dict(
    vocab_size=4096,
    d_model=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=4,
    mlp_dim=1376,
    rope_theta=10000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=False,
  ),
  # HuggingFaceTB/SmolLM2-135M: 134.5M params.
  "smollm2-135m": dict(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    mlp_dim=1536,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
  # Qwen/Qwen2.5-0.5B: 494M params.
  "qwen2.5-0.5b": dict(
    FAMILY_TRAITS["qwen2"],
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    mlp_dim=4864,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    norm_eps=1e-6,
    tie_embeddings=True,
  ),
  # Qwen/Qwen3-0.6B: 596M params (q/k norm, tied).
  "qwen3-0.6b": dict(
    FAMILY_TRAITS["qwen3"],
    vocab_size=151936,
    d_model=1024,
    n_layers=28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=3072,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    norm_eps=1e-6,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.2-1B: 1.236B params, Llama 3 RoPE scaling.
  "llama-3.2-1b": dict(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_ROPE,
    max_position_embeddings=131072,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.2-3B: 3.21B params.
  "llama-3.2-3b": dict(
    vocab_size=128256,
    d_model=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=8192,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_ROPE,
    max_position_embeddings=131072,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.1-8B: 8.03B params (factor 8).
  "llama-3.1-8b": dict(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    rope_theta=500000.0,
    rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
    max_position_embeddings=131072,
    norm_eps=1e-5,
    tie_embeddings=False,
  ),
  # mistralai/Mistral-7B-v0.3: 7.25B params (no sliding window since v0.2).
  "mistral-7b": dict(
    FAMILY_TRAITS["mistral"],
    vocab_size=32768,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    norm_eps=1e-5,
    tie_embeddings=False,
  ),
  # google/gemma-2b (Gemma 1): 2.51B params.
  "gemma-2b": dict(
    FAMILY_TRAITS["gemma"],
    vocab_size=256000,
    d_model=2048,
    n_layers=18,
    n_heads=8,
    n_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    rope_theta=10000.0,
    max_position_embeddings=8192,
    norm_eps=1e-6,
  ),
  # google/gemma-2-2b: 2.61B params; sliding (4096) and global layers alternate.
  "gemma-2-2b": dict(
    FAMILY_TRAITS["gemma2"],
    vocab_size=256000,
    d_model=2304,
    n_layers=26,
    n_heads=8,
    n_kv_heads=4,
    head_dim=256,
    mlp_dim=9216,
    rope_theta=10000.0,
    max_position_embeddings=8192,
    norm_eps=1e-6,
    query_pre_attn_scalar=256.0,
    attn_softcap=50.0,
    final_softcap=30.0,
    sliding_window=4096,
    layer_types=sliding_pattern(26, 2),
  ),
  # google/gemma-3-1b-pt: 1.0B params; 5 sliding (512) layers per global one.
  "gemma-3-1b": dict(
    FAMILY_TRAITS["gemma3"],
    vocab_size=262144,
    d_model=1152,
    n_layers=26,
    n_heads=4,
    n_kv_heads=1,
    head_dim=256,
    mlp_dim=6912,
    rope_theta=1000000.0,
    rope_local_theta=10000.0,
    max_position_embeddings=32768,
    norm_eps=1e-6,
    query_pre_attn_scalar=256.0,
    sliding_window=512,
    layer_types=sliding_pattern(26, 6),
  ),
}
