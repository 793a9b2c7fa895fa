"""Concept pool: captions → noun-chunk concepts (:mod:`regionclip.concepts.parse`)."""

from regionclip.concepts.parse import (
    BUILTIN_STOP,
    CaptionParse,
    CaptionParser,
    chunk_concept,
    chunk_phrase,
    load_nlp,
    parse_doc,
    read_word_list,
    select_vocabulary,
)

__all__ = [
    "BUILTIN_STOP",
    "CaptionParse",
    "CaptionParser",
    "chunk_concept",
    "chunk_phrase",
    "load_nlp",
    "parse_doc",
    "read_word_list",
    "select_vocabulary",
]
