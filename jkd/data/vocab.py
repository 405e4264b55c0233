"""Teacher and student vocabularies: the shared part, checked against both tokenizers.

Checkpoints often pad their embedding past the tokenizer (Qwen2.5's 0.5B has 151,936 rows, its 7B
152,064, for 151,665 tokens). Distillation compares distributions over the *same* tokens, so
:func:`shared_vocabulary` checks that the two tokenizers give every id the same token and returns
how many ids are real; losses then read the first that many logits (or output-weight rows) of each
model. Two different tokenizers are refused at setup, naming both sizes and the first id whose
tokens differ (:func:`same_tokens` asks the question without raising).
"""

from __future__ import annotations

from jkd.data.tokenizer import Tokenizer


class VocabularyMismatchError(ValueError):
    """Teacher and student do not share a tokenizer."""


def shared_vocabulary(teacher: Tokenizer, student: Tokenizer, *, teacher_rows: int, student_rows: int) -> int:
    """The number of ids both models use for the same tokens.

    Args:
      teacher, student: the two tokenizers.
      teacher_rows, student_rows: the models' vocabulary sizes (rows of their output weights),
        which may exceed the tokenizers' by padding.

    Raises ``VocabularyMismatchError`` if the tokenizers differ on any id, or if a model has fewer
    rows than its tokenizer has tokens.
    """
    nt, ns = teacher.vocab_size, student.vocab_size
    for who, rows, n in (("teacher", teacher_rows, nt), ("student", student_rows, ns)):
        if rows < n:
            raise VocabularyMismatchError(
                f"the {who} model has {rows} vocabulary rows but its tokenizer has {n} tokens"
            )
    tv = {i: tok for tok, i in teacher.backend.get_vocab(with_added_tokens=True).items()}
    sv = {i: tok for tok, i in student.backend.get_vocab(with_added_tokens=True).items()}
    for i in range(max(nt, ns)):
        if tv.get(i) != sv.get(i):
            raise VocabularyMismatchError(
                f"teacher and student tokenizers differ: teacher vocabulary {nt} tokens ({teacher_rows} model "
                f"rows), student {ns} tokens ({student_rows} model rows); first difference at id {i}: teacher "
                f"{tv.get(i)!r}, student {sv.get(i)!r}. Token-level losses need one tokenizer for both; across "
                "tokenizers choose a cross-tokenizer loss (jkd lm distill --cross-tokenizer uld|hybrid; "
                "jkd.train.lm_cross.CrossTokenizerKD from Python) or give a student of the teacher's tokenizer"
            )
    return nt


def same_tokens(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give every id the same token (one vocabulary)."""
    return a.vocab_size == b.vocab_size and a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(
        with_added_tokens=True
    )
