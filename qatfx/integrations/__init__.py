"""Adapters for the training frameworks users bring: Hugging Face `transformers.Trainer`
(`qatfx.integrations.transformers`) and torchtune's quantizer protocol
(`qatfx.integrations.torchtune`). Each imports its framework lazily, only when used."""
