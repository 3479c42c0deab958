"""BentoML serving of fvgpt bundles: `fvgpt serve` (cli.py), the services (service.py), their routes (app.py)."""
