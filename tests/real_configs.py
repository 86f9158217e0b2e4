"""config.json of the published checkpoints, as far as the reference notes have seen or inferred them.

Test data, not code under test: these are the files a user's download would contain, so the parser
is checked against the real key names rather than against our own generator.
"""

STABLELM_1_6B_4E = {
    "_name_or_path": "./checkpoints/llavastablelm-2b-other",
    "architectures": ["MoELLaVAStablelmForCausalLM"],
    "auto_map": {
        "AutoConfig": "stabilityai/stablelm-2-1_6b--configuration_stablelm_epoch.StableLMEpochConfig",
        "AutoModelForCausalLM": "stabilityai/stablelm-2-1_6b--modeling_stablelm_epoch.StableLMEpochForCausalLM",
    },
    "bos_token_id": 100257, "eos_token_id": 100257, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
    "hidden_size": 2048, "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu",
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 4096,
    "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_projector_lr": None,
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_video_tower": None,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "model_type": "moe_llava_stablelm",
    "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, 24, 2)), "moe_mode": "sparse",
            "num_experts": [4] * 12, "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": ["gate_proj", "up_proj", "down_proj", "wg"], "use_residual": False},
    "norm_eps": 1e-05, "num_attention_heads": 32, "num_heads": 32, "num_hidden_layers": 24,
    "num_key_value_heads": 32, "pad_token_id": 100280, "rope_pct": 0.25, "rope_theta": 10000,
    "rotary_scaling_factor": 1.0, "tie_word_embeddings": False, "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "tune_mm_mlp_adapter": False, "use_cache": True,
    "use_mm_proj": True, "use_qkv_bias": True, "video_global_proj": False, "video_projector_type": "linear",
    "video_spatial_proj": False, "video_temproal_proj": False, "vocab_size": 100352,
}

QWEN_1_8B_4E = {
    "architectures": ["MoELLaVAQWenForCausalLM"],
    "auto_map": {"AutoConfig": "Qwen/Qwen-1_8B--configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "Qwen/Qwen-1_8B--modeling_qwen.QWenLMHeadModel"},
    "bf16": True, "hidden_size": 2048, "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu",
    "intermediate_size": 11008, "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192,
    "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "model_type": "moe_llava_qwen",
    "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, 24, 2)), "moe_mode": "sparse",
            "num_experts": [4] * 12, "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"], "use_residual": False},
    "no_bias": True, "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 151646,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192, "vocab_size": 151936,
}

PHI2_2_7B_4E = {
    "architectures": ["MoELLaVAPhiForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": None, "embd_pdrop": 0.0, "eos_token_id": None,
    "hidden_act": "gelu_new", "hidden_size": 2560, "image_aspect_ratio": "pad",
    "image_projector_type": "mlp2x_gelu", "intermediate_size": 10240, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336",
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "model_type": "moe_llava_phi",
    "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, 32, 2)), "moe_mode": "sparse",
            "num_experts": [4] * 16, "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": ["fc1", "fc2", "wg"], "use_residual": False},
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 50256,
    "partial_rotary_factor": 0.4, "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 51200,
}
