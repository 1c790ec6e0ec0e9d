"""The library every GPU Router service stands on. Its rooms, by what they hold:

- `cluster`: the configuration and its YAML reader, the Ollama client, the capacity sources, one observation
  of the cluster (`observe`) and the state it yields;
- `sizing`: how much memory a model needs on a node and whether it fits: catalog, estimates, llama-server
  footprint, Ollama eras, room, memory held outside Ollama;
- `decide`: pure decisions: check, route and plan (`placement`), and which node serves one request (`choose`);
- `act`: carrying a plan out through the Ollama API (`execute`) and the job queue that runs it once at a time
  per model (`jobs`);
- `serve`: what every HTTP service shares: waitress setup, `--listen`, credentials, Go-shaped JSON errors;
- `logfmt`, `units`, `urls`, `render`: one log format, one way to write sizes and addresses, one set of words
  for every command, page and JSON answer.

The library imports no service (exporter, optimizer, proxy, simulator) and not the command line (cli).
"""
