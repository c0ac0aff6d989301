"""End-to-end workflows behind the CLI: pretrain a foundation model, fine-tune it few-shot, the demo."""
