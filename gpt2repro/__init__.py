"""gpt2repro's library: everything the commands and the model files on top use, one module per concern."""
