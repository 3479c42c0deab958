"""The BentoML shell around the serving engine: the service, its inputs, the GET routes, error answers and the
hooks into BentoML's internals."""
