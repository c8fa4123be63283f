"""Hugging Face config.json dicts of published models (public facts), for import and accounting tests."""

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu")
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0,
                  sliding_window=4096, tie_word_embeddings=False, hidden_act="silu")
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                 tie_word_embeddings=True, hidden_act="silu")
MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                    num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu")
QWEN15_MOE_A27B = dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632,
                       moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, num_experts=60,
                       num_experts_per_tok=4, decoder_sparse_step=1, norm_topk_prob=False, mlp_only_layers=[],
                       tie_word_embeddings=False, hidden_act="silu")
OLMOE_1B_7B = dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, num_experts=64,
                   num_experts_per_tok=8, norm_topk_prob=False, tie_word_embeddings=False, hidden_act="silu")
DEEPSEEK_MOE_16B = dict(model_type="deepseek", hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=102400, n_routed_experts=64, n_shared_experts=2,
                        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
                        scoring_func="softmax", tie_word_embeddings=False, hidden_act="silu")
# Qwen3 (published config.json files; not in ALL, whose families test_config.py checks against PUBLISHED).
# Values transformers' Qwen3MoeConfig defaults differently are set here explicitly: num_hidden_layers 48 (24),
# norm_topk_prob true (false), max_position_embeddings 40960 (32768), rope_theta 1e6.
QWEN3_8B = dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=False,
                use_sliding_window=False, tie_word_embeddings=False, hidden_act="silu")
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6,
                     rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False, tie_word_embeddings=False,
                     router_aux_loss_coef=0.001, hidden_act="silu")
# DeepSeek-V3 (deepseek-ai/DeepSeek-V3, config.json; not in ALL: its YaRN rope_scaling is refused on import, so
# the accounting test drops that key, which changes no parameter). The release is FP8 (quantization_config).
DEEPSEEK_V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                   moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, moe_layer_freq=1,
                   num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                   n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                   norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001,
                   seq_aux=True, ep_size=1, tie_word_embeddings=False, num_nextn_predict_layers=1,
                   max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, attention_bias=False,
                   attention_dropout=0.0, hidden_act="silu", bos_token_id=0, eos_token_id=1,
                   rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                     beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                   quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                            weight_block_size=[128, 128]))

ALL = {"llama": LLAMA2_7B, "mistral": MISTRAL_7B, "qwen2": QWEN2_05B, "mixtral": MIXTRAL_8X7B,
       "qwen2_moe": QWEN15_MOE_A27B, "olmoe": OLMOE_1B_7B, "deepseek": DEEPSEEK_MOE_16B}


def shrink(cfg: dict) -> dict:
    """The same architecture at a size that builds in milliseconds (structure kept, widths divided)."""
    small = dict(cfg)
    heads = 4
    kv = max(1, heads * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"])
    small.update(hidden_size=32, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=97,
                 num_hidden_layers=3, intermediate_size=48)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in small:
            small[key] = 16 if key == "moe_intermediate_size" else 24
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in small:
            small[key] = 6
    if "num_experts_per_tok" in small:
        small["num_experts_per_tok"] = 2
    return small
