import json

from transformers import Wav2Vec2CTCTokenizer

from asr.data.text import canonical, normalize


def test_normalize_librispeech_style():
    assert normalize("  Hello,   world! It’s  twenty-one.\n") == "HELLO WORLD IT'S TWENTY ONE"
    assert normalize("") == ""


def test_encode_decode_round_trip(tokenizer):
    text = "THE QUICK BROWN FOX'S JUMP"
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.delimiter_id) == 4
    assert tokenizer.decode(ids) == text
    assert tokenizer.unknown_characters("CAFÉ 9") == {"É", "9"}
    assert tokenizer.unknown_characters("A|B") == {"|"}  # the word delimiter is a token, not a character


def test_the_vocabulary_check_sees_what_normalisation_keeps(tokenizer):
    """A character the check lets through is kept by normalisation, and one it rejects would be stripped."""
    for text in ("IT’S TWENTY-ONE", "ROCK'N ROLL"):
        assert not tokenizer.unknown_characters(canonical(text))
        assert normalize(text) == canonical(text).replace("  ", " ")
    assert tokenizer.unknown_characters(canonical("NAÏVE | 2")) == {"Ï", "|", "2"}


def test_vocabulary_matches_transformers_tokenizer(tokenizer, tmp_path):
    hf = Wav2Vec2CTCTokenizer(str(tokenizer.save(tmp_path)), word_delimiter_token="|")
    text = "HELLO WORLD IT'S ME"
    assert len(hf) == len(tokenizer) == 32
    assert hf(text).input_ids == tokenizer.encode(text)
    assert hf.pad_token_id == tokenizer.pad_id
    assert hf.decode(tokenizer.encode(text), group_tokens=False) == text


def test_unknown_characters_encode_as_unk_and_the_vocabulary_saves_into_a_new_folder(tokenizer, tmp_path):
    assert tokenizer.encode("É A") == [tokenizer.unk_id, tokenizer.delimiter_id, tokenizer.token_to_id["A"]]
    path = tokenizer.save(tmp_path / "new" / "model")
    assert path == tmp_path / "new" / "model" / "vocab.json"
    assert json.loads(path.read_text()) == tokenizer.token_to_id
