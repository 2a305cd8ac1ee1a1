"""Training the retriever: the card embedder fine-tuned on the registry's own adapters (LoraRetriever)."""
