"""Models: where weights come from (the Hub, local folders, single files), how they load,
the built-in models, and the LoRAs and embeddings applied on top."""
