"""Named model shapes, as plain data.

Each preset holds only `TransformerConfig` fields that describe a model's
shape (no dtypes, no remat), so a config can override any of them.
The public shapes are copied from the Hugging Face `config.json` files of
the released checkpoints; their param counts are asserted in the tests.
"""

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
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
  # Qwen/Qwen2.5-0.5B: 494M params.
  "qwen2.5-0.5b": dict(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    mlp_dim=4864,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.2-1B: 1.236B params.
  # NOTE: Llama 3 "rope_scaling" (rope_type='llama3', factor 32) is NOT
  # implemented: HF divides the low-frequency RoPE frequencies by 32, plain
  # RoPE does not, so logits differ slightly from HF (more so far into long
  # sequences). Shapes and weights are compatible.
  "llama-3.2-1b": dict(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.2-3B: 3.21B params (same rope-scaling caveat).
  "llama-3.2-3b": dict(
    vocab_size=128256,
    d_model=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
}
