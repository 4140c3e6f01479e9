"""Corpus recipes: turn a corpus as distributed into a manifest (`serval data prepare`).

Each recipe maps the corpus's own labels onto the 7 classes (or, with --keep-labels, keeps the
corpus's own names), fills language, speaker and corpus, and lists every file it leaves out, with
the reason. Splits are assigned by speaker (never by clip) with a seeded rule, or taken from the
corpus's official split. The label mappings and the split rule are documented in docs/data.md.

Modules: `recipes` (one rule per corpus: the table), `labels` (label codes and mappings),
`metadata` (readers of the corpora labelled in tables), `rules` (what a rule says, and the one loop
that applies it), `files`, `split` (the speaker split), `prepare` (`prepare_corpus`), `cli`.
"""

from serval.corpora.cli import add_arguments, run
from serval.corpora.files import CorpusError
from serval.corpora.labels import OPTIONS
from serval.corpora.prepare import corpus_labels, dropped_path, prepare_corpus, split_warnings
from serval.corpora.recipes import RULES
from serval.corpora.rules import Dropped, Rule
from serval.corpora.split import assign_splits

__all__ = [
    "OPTIONS",
    "RULES",
    "CorpusError",
    "Dropped",
    "Rule",
    "add_arguments",
    "assign_splits",
    "corpus_labels",
    "dropped_path",
    "prepare_corpus",
    "run",
    "split_warnings",
]
