"""The cluster as the router sees it: configuration, the Ollama client, capacity sources, observation and state."""
