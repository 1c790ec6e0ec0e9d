"""Acting on the cluster: a plan carried out and verified through the Ollama API, and the job queue that runs it
at most once at a time per model (used by the optimizer and the proxy's heal)."""
