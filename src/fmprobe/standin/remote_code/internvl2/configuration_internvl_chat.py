"""Stand-in of InternVL2's ``configuration_internvl_chat.py``: InternViT + an LLM (here a tiny Llama) + dynamic tiling."""

from transformers import LlamaConfig, PretrainedConfig

from .configuration_intern_vit import InternVisionConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, force_image_size=None, downsample_ratio=0.5,
                 select_layer=-1, ps_version="v2", dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                 max_dynamic_patch=4, template="internlm2-chat", **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = LlamaConfig(**(llm_config or {}))
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.select_layer = select_layer
        self.ps_version = ps_version
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.template = template

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
