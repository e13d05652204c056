"""Stand-in of CogVLM2's remote code (``modeling_cogvlm.py`` + ``visual.py``), shaped like the real one.

The same module names and data flow as THUDM/cogvlm2-llama3-chat-19B, at toy sizes and without rotary embeddings
or a KV cache:

- ``model.vision`` (EVA2-CLIP): ``patch_embedding`` (conv + CLS + learned positions), ``transformer.layers`` (post-
  norm blocks with a fused ``attention.query_key_value``), ``conv`` (2x2, stride 2), ``linear_proj`` (GLU), ``boi`` /
  ``eoi``; output ``[boi, grid, eoi] / scaling_factor``;
- ``model.layers``: decoder layers whose attention and MLP have a vision expert and a language expert; the vision
  expert runs on the rows ``get_expert_mask`` marks (the image positions except the last one, ``eoi``);
- the LM sequence: ``BOS``, then the image rows at the positions with ``token_type_ids == 1``, then the text.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_cogvlm import CogVLMConfig

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


# ------------------------------------------------------------------------------------------------ EVA2-CLIP


class PatchEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = nn.Conv2d(config["in_channels"], config["hidden_size"], kernel_size=config["patch_size"],
                              stride=config["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, config["hidden_size"]))
        self.position_embedding = nn.Embedding(config["num_positions"], config["hidden_size"])

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config["num_heads"]
        self.query_key_value = nn.Linear(config["hidden_size"], config["hidden_size"] * 3)
        self.dense = nn.Linear(config["hidden_size"], config["hidden_size"])

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation_fn = ACT2FN[config["hidden_act"]]
        self.fc1 = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.fc2 = nn.Linear(config["intermediate_size"], config["hidden_size"])

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])
        self.attention = Attention(config)
        self.mlp = VisionMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config["num_hidden_layers"])])

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class GLU(nn.Module):
    def __init__(self, config, in_features):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.act2 = nn.functional.silu
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(self.act2(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = Transformer(vision)
        self.linear_proj = GLU(config, in_features=config.hidden_size)
        self.conv = nn.Conv2d(vision["hidden_size"], config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vision["scaling_factor"]

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        b, s, h = x.shape
        side = int(s**0.5)
        x = self.conv(x.reshape(b, side, side, h).permute(0, 3, 1, 2))
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)
        return x / self.scaling_factor


# ------------------------------------------------------------------------------------------------ language model


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def get_expert_mask(token_type_ids):
    vision_token_mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision_token_mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return vision_token_mask, ~vision_token_mask


class VisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, hidden_states, vision_token_mask):
        output = torch.empty_like(hidden_states)
        output[vision_token_mask] = self.vision_mlp(hidden_states[vision_token_mask])
        output[~vision_token_mask] = self.language_mlp(hidden_states[~vision_token_mask])
        return output


class VisionExpertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        size = config.hidden_size
        self.vision_expert_query_key_value = nn.Linear(size, 3 * size, bias=True)
        self.vision_expert_dense = nn.Linear(size, size, bias=False)
        self.language_expert_query_key_value = nn.Linear(size, 3 * size, bias=False)
        self.language_expert_dense = nn.Linear(size, size, bias=False)

    def forward(self, hidden_states, vision_token_mask):
        b, n, d = hidden_states.shape
        mixed = torch.empty(b, n, 3 * d, dtype=hidden_states.dtype, device=hidden_states.device)
        mixed[vision_token_mask] = self.vision_expert_query_key_value(hidden_states[vision_token_mask])
        mixed[~vision_token_mask] = self.language_expert_query_key_value(hidden_states[~vision_token_mask])
        q, k, v = mixed.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        out = torch.empty_like(hidden_states)
        out[vision_token_mask] = self.vision_expert_dense(context[vision_token_mask])
        out[~vision_token_mask] = self.language_expert_dense(context[~vision_token_mask])
        return out


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = VisionExpertAttention(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, vision_token_mask):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), vision_token_mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), vision_token_mask)


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, 0.02)


class CogVLMModel(CogVLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.post_init()

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, use_cache=False,
                **kwargs):
        inputs_embeds = self.embed_tokens(input_ids)
        if images is not None:
            features = self.vision(torch.stack([image for sample in images for image in sample]))
            inputs_embeds = inputs_embeds.index_put([token_type_ids == VISION_TOKEN_TYPE],
                                                    features.reshape(-1, features.shape[-1]))
        vision_token_mask, _ = get_expert_mask(token_type_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, vision_token_mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


class CogVLMForCausalLM(CogVLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, use_cache=False,
                **kwargs):
        outputs = self.model(input_ids=input_ids, images=images, token_type_ids=token_type_ids,
                             attention_mask=attention_mask)
        return CausalLMOutputWithPast(logits=self.lm_head(outputs.last_hidden_state))
