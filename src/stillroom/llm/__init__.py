"""Language models through Hugging Face transformers: loading from local folders (hub.py), encoder
layer reduction and sentence embeddings, causal-LM token-level and on-policy distillation.

transformers is an optional extra (`pip install 'stillroom[llm]'`); nothing here is imported by
the core package."""
