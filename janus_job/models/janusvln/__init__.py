"""JanusVLN on Qwen2.5-VL: the model, building it from checkpoints, export, lean activations."""
