"""Reporters receive data (frames, dicts) and render it; they never open models or traces themselves."""
