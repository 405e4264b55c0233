"""Shared vocabularies of teacher and student: padding rows aligned, other tokenizers refused."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from jkd.data.tokenizer import Tokenizer, byte_tokenizer
from jkd.data.vocab import VocabularyMismatchError, shared_vocabulary


def test_padding_rows_are_cut_to_the_tokenizer():
    assert shared_vocabulary(byte_tokenizer(), byte_tokenizer(), teacher_rows=264, student_rows=259) == 259


def test_another_tokenizer_is_refused_naming_sizes_and_the_first_difference():
    other = Backend(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(
        VocabularyMismatchError,
        match=r"teacher vocabulary 259 tokens \(264 model rows\), student 3 "
        r"tokens \(8 model rows\); first difference at id 0",
    ):
        shared_vocabulary(byte_tokenizer(), Tokenizer(other), teacher_rows=264, student_rows=8)


def test_a_model_smaller_than_its_tokenizer():
    with pytest.raises(
        VocabularyMismatchError, match="student model has 200 vocabulary rows but its tokenizer has 259"
    ):
        shared_vocabulary(byte_tokenizer(), byte_tokenizer(), teacher_rows=259, student_rows=200)


def test_an_added_token_that_differs():
    a, b = byte_tokenizer(), byte_tokenizer()
    a.backend.add_special_tokens(["<tool>"])
    b.backend.add_special_tokens(["<call>"])
    with pytest.raises(VocabularyMismatchError, match="id 259: teacher '<tool>', student '<call>'"):
        shared_vocabulary(a, b, teacher_rows=300, student_rows=300)
