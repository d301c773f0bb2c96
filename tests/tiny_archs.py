"""Tiny causal LMs of every `transformers` architecture the fuzz tests run `inherit` and TriForce on, built from
configs (nothing downloaded): two blocks, a 48-token vocabulary, grouped-query attention where the class has it,
and each family's attention variant (sliding windows for Mistral, Qwen2, Gemma 2 and Starcoder2)."""
import torch
import transformers as T

V = 48
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {  # name: (config class, model class, settings beyond COMMON)
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral-window": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 8}),
    "qwen2-window": (T.Qwen2Config, T.Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2-window": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 8}),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, None),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),
    "starcoder2-window": (T.Starcoder2Config, T.Starcoder2ForCausalLM, {"sliding_window": 8}),
}


def tiny(name: str, seed: int = 0, **overrides) -> T.PreTrainedModel:
    "A tiny `name` model (see ARCHS), seeded, in eval mode."
    config_cls, model_cls, extra = ARCHS[name]
    if extra is None:  # GPT-2 names its sizes its own way
        kw = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    else:
        kw = {**COMMON, **extra}
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**kw, **overrides})).eval()
