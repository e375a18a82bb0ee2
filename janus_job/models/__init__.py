"""Model code: the VGGT aggregator and JanusVLN on transformers' Qwen2.5-VL."""
