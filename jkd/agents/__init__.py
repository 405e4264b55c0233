"""Agents: tool-call formats of model families, tools a model calls, and the loop between them."""
