"""Tiny random configs of the eleven mixture-of-experts families of the installed transformers
(4 routed experts of 16 neurons, top-2; shared experts where the family has them)."""
import torch

from skilllens.core.tokenizers import BYTE_VOCAB_SIZE as V

BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=256,
            bos_token_id=257, eos_token_id=258)
MOE = dict(num_experts_per_tok=2)


def _cfg(name):
    import transformers as tf
    shared = dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                  intermediate_size=48)
    ds = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
              n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1)
    table = {
        "mixtral": (tf.MixtralConfig, dict(intermediate_size=16, num_local_experts=4)),
        "qwen2_moe": (tf.Qwen2MoeConfig, shared),
        "qwen3_moe": (tf.Qwen3MoeConfig, dict(intermediate_size=48, moe_intermediate_size=16,
                                              num_experts=4, head_dim=8)),
        "qwen3_next": (tf.Qwen3NextConfig, dict(shared, head_dim=8,
                                                layer_types=["linear_attention",
                                                             "full_attention"])),
        "olmoe": (tf.OlmoeConfig, dict(intermediate_size=16, num_experts=4)),
        "deepseek_v3": (tf.DeepseekV3Config, dict(ds, kv_lora_rank=16, q_lora_rank=16,
                                                  qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                  v_head_dim=8, head_dim=8, num_key_value_heads=4,
                                                  rope_scaling=None, rope_parameters=None)),
        "gpt_oss": (tf.GptOssConfig, dict(intermediate_size=16, num_local_experts=4, head_dim=8,
                                          layer_types=["sliding_attention", "full_attention"])),
        "llama4_text": (tf.Llama4TextConfig, dict(intermediate_size=16, intermediate_size_mlp=48,
                                                  num_local_experts=4, head_dim=8,
                                                  num_experts_per_tok=1)),
        "glm4_moe": (tf.Glm4MoeConfig, dict(ds, n_group=1, head_dim=8)),
        "granitemoe": (tf.GraniteMoeConfig, dict(intermediate_size=16, num_local_experts=4)),
        "phimoe": (tf.PhimoeConfig, dict(intermediate_size=16, num_local_experts=4)),
    }
    cls, kw = table[name]
    return cls(**{**BASE, **MOE, **kw})


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss",
            "llama4_text", "glm4_moe", "granitemoe", "phimoe")


def tiny_moe(name, **overrides):
    """``LoadedModel`` of a tiny random model of family ``name`` (seeded)."""
    from transformers import AutoModelForCausalLM

    from skilllens import load_model
    from skilllens.core.tokenizers import byte_tokenizer

    cfg = _cfg(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        for p in model.parameters():  # some families initialise routers/biases to zero
            if p.abs().sum() == 0 or p.ndim == 3:
                torch.nn.init.normal_(p, std=0.2)
    model.eval()  # a passed-in model keeps its mode (PhiMoE's router jitter is train-only)
    return load_model((model, byte_tokenizer()), device="cpu")
