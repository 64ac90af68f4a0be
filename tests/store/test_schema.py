"""minard/store/schema.py names every Redis key once, and docs/storage.md lists them all."""

import re
from pathlib import Path

from minard.store import schema

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "storage.md"
BEGIN, END = "<!-- key index: begin -->", "<!-- key index: end -->"


def test_storage_doc_key_index_is_generated_from_the_schema():
    """The key index in docs/storage.md equals schema.doc_table() (regenerate it when this fails)."""
    text = DOC.read_text()
    assert BEGIN in text and END in text
    current = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"
    assert current == schema.doc_table()


def test_every_family_has_a_type_and_a_docstring():
    for name, family in schema.families().items():
        assert family.type and family.doc, name
        assert "{" in family.template, f"{name} is a single key; make it a plain constant"


def test_family_keys_and_patterns():
    assert schema.SCALAR.key(step=10, bucket=5, group="trig") == "ts:{10:5}:trig"
    assert schema.CHANNEL.key(step=10, bucket=5, name="hits") == "ch:{10:5}:hits"
    assert schema.RUN_PART.key(run=3510, part="nhit") == "{run:3510}:nhit"
    assert schema.RUN.pattern == "{run:*}" and schema.SCALAR.pattern == "ts:{*:*}:*"
    assert schema.STATS.pattern == "stats:*"
    assert schema.POOL_FLUSHED.pattern == "pool:*:*:*:flushed"


def test_no_key_literal_outside_the_schema():
    """Modules build key names through the schema, never by spelling a family's prefix."""
    forms = [re.escape(f.pattern).replace(r"\*", "[^\"']*") for f in schema.families().values()]
    forms += [re.escape(key) for key in schema.single_keys()]
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(forms))
    offenders = []
    for path in (REPO / "minard").rglob("*.py"):
        if path.name == "schema.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
