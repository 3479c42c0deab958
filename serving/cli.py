"""`fvgpt serve` (placeholder until the service lands)."""


def register(sub) -> None:
    sub.add_parser("serve", help="serve a bundle over HTTP (not yet available)")
