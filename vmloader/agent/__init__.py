"""The in-guest agent: stdlib only, Python >= 3.6, imports nothing but vmloader.protocol."""
