"""Ready-made QAT workflows: the demo, fine-tuning and evaluation behind the qatfx CLI."""
