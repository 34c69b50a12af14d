"""A no-op Flower app: Flower's own cost of a message exchange on a deployment."""
