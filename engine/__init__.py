"""moeserve engine: model, tokenizer, scheduling."""
