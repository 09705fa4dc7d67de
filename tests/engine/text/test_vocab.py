from engine.text.vocab import TOKENIZER_DIR, WORDS, load_tokenizer, tokenizer_files


def test_shipped_tokenizer_matches_builder():
    for name, text in tokenizer_files().items():
        assert (TOKENIZER_DIR / name).read_text(encoding="utf-8") == text, f"run python -m engine.vocab ({name})"


def test_listed_words_are_single_tokens_and_anything_tokenizes():
    tok = load_tokenizer()
    for word in WORDS:
        if word.isalpha():
            assert len(tok(word).input_ids) == 3, word
    ids = tok("zebra ünïcode ✨", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
