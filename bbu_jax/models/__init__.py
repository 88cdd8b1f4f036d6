"""Model code: Qwen2.5-VL (qwen2_5_vl), the detection head, one attention entry point."""
