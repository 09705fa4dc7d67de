"""Text: A1111's prompt syntax and its encoding, prompt styles, the tokenizer."""
