"""Hypothesis fuzzing of the glob → PostgreSQL regex translation of the quarantine filters
(:func:`avgate.quarantine.postgres.glob_to_regex`) against fnmatch, the file store's matcher.

The regex it emits is also valid Python ``re`` syntax (``\\uXXXX`` escapes, ``(?:``,
bracket sets), so it is checked here without a database; the same property runs against a
real PostgreSQL in tests/integration/test_postgres_quarantine.py.
"""

from __future__ import annotations

import fnmatch
import os
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from avgate.quarantine.postgres import glob_to_regex

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
# the characters that mean something to fnmatch or to a regex, and a few plain ones
ALPHABET = "ab-!^]\\[*?.$()|+{}&~é\n"
globs = st.text(alphabet=ALPHABET, max_size=12)
values = st.text(alphabet=ALPHABET.replace("*", "").replace("?", ""), max_size=10)


def python_match(pattern: str, value: str) -> bool:
    # PostgreSQL's $ is the end of the string; Python's also matches before a final \n
    regex = glob_to_regex(pattern)
    assert regex.startswith("^(?:") and regex.endswith(")$")
    return re.match(regex[:-1] + r"\Z", value, re.DOTALL) is not None


@settings(max_examples=EXAMPLES, deadline=None)
@given(pattern=globs, value=values)
@example(pattern="[!]", value="!")
@example(pattern="[]-a]", value="b")
@example(pattern="[z-a]", value="-")
@example(pattern="[!z-a]", value="q")
@example(pattern="[a-]", value="-")
@example(pattern="[\\]", value="\\")
@example(pattern="[^a]", value="^")
@example(pattern="a*b?[!c]", value="axxbyd")
def test_translation_matches_what_fnmatch_matches(pattern: str, value: str) -> None:
    assert python_match(pattern, value) == fnmatch.fnmatchcase(value, pattern)


@settings(max_examples=EXAMPLES, deadline=None)
@given(pattern=globs, value=values)
def test_the_value_itself_escaped_matches_only_itself(pattern: str, value: str) -> None:
    # a value made into a glob by escaping every special character matches itself
    literal = "".join(f"[{c}]" if c in "*?[" else c for c in value)
    assert python_match(literal, value)
