"""The torch reference model: what every exported graph is validated against. Imports torch."""
