"""Per-sequence text pipeline: token ids -> streamed text, stop strings, R1 reasoning, tool calls.

Pure Python and tokenizer-agnostic beyond `decode`, so it runs in any process (no torch).
"""
