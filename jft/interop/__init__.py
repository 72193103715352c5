"""Other libraries' file formats: Hugging Face checkpoints (`hf`) and PEFT
LoRA adapters (`peft`), read and written without importing either."""
