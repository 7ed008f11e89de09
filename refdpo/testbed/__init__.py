"""Controlled, offline testbeds: tiny models, tokenizers and synthetic preference data built on the spot."""
