"""The Llama model, its configuration, loading and tokenizers (execute side)."""
