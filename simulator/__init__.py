"""A simulated Ollama fleet: Ollama-compatible HTTP servers with GPUs, a scheduler and injectable faults."""
