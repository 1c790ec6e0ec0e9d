"""How much memory a model needs on a node, by the rules of the Ollama it runs, and whether it fits there."""
