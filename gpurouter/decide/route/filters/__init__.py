"""The pipeline's filters: which nodes may serve a request at all."""
