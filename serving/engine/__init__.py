"""The serving engine (no web framework): settings, the model repository, request and answer models, admission,
decoding, the tower pool and its worker, the pipeline and readiness. `engine.Engine` wires them; serving/shell/ puts
BentoML's HTTP server in front. docs/architecture.md ("Serving") has the map."""
