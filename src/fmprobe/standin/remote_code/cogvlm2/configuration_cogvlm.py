"""Stand-in of CogVLM2's ``configuration_cogvlm.py`` (THUDM/cogvlm2-llama3-chat-19B): a tiny remote-code config.

Written by fmprobe.standin.remote for offline tests; the real checkpoint ships its own file of the same name."""

from transformers import PretrainedConfig


class CogVLMConfig(PretrainedConfig):
    model_type = "cogvlm2"

    def __init__(self, vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=2, vision_config=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                 pad_token_id=3, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.vision_config = vision_config or {}
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
