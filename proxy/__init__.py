"""`gpu-router proxy`: one Ollama (and OpenAI-compatible) endpoint that routes each request to a node where
its model runs on GPU."""
