"""Templates are plain text with ``{field}`` slots: anything str.format would do beyond filling a slot
is refused, by the task parser as by the artifact loader."""

from __future__ import annotations

import pytest

from lopa.tasks import TaskError
from lopa.tasks.classification import UserTask, check_template
from lopa.templates import MAX_TEMPLATE_CHARS, TemplateError, template_slots


def test_plain_slots_in_order_each_once():
    assert template_slots("{premise} ? {hypothesis} {premise} Answer: {{literal}}") == ["premise", "hypothesis"]
    assert template_slots("no slots at all") == []


@pytest.mark.parametrize("template,named", [
    ("{text:>8000000000}", "has a format spec"),
    ("{text:{width}}", "has a format spec"),
    ("{text!r}", "has a conversion"),
    ("{text!s:10}", "has a conversion"),
    ("{text.__class__}", "plain column name"),
    ("{text[0]}", "plain column name"),
    ("{}", "plain column name"),
    ("{0}", "plain column name"),
    ("{text", "malformed"),
    ("text}", "malformed"),
    ("{text}\ud800", "not valid Unicode"),
    (None, "must be a string"),
    ("x" * (MAX_TEMPLATE_CHARS + 1), "longer than"),
])
def test_everything_beyond_a_plain_slot_is_refused(template, named):
    with pytest.raises(TemplateError, match=named):
        template_slots(template)


def test_the_task_parser_refuses_them_as_task_errors(tmp_path):
    with pytest.raises(TaskError, match="format spec"):
        check_template("{text:>8000000000} It was", ["text", "label"], "reviews.csv")
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n')
    with pytest.raises(TaskError, match="conversion"):
        UserTask(path, template="{text!r} It was", label_words=" terrible, great")


# -- reading a filled template back into its fields ------------------------------------------------------
from hypothesis import given, strategies as st  # noqa: E402

from lopa.templates import field_reader  # noqa: E402


@given(st.text(max_size=40), st.text(max_size=40))
def test_a_filled_template_reads_back_into_its_fields(a, b):
    template = "Q: {first}\nA: {second} Answer:"
    got = field_reader(template)(template.format(first=a, second=b))
    # where a field holds the words between the slots, the split may fall elsewhere, but it always
    # refills the same text
    assert template.format(first=got[0], second=got[1]) == template.format(first=a, second=b)
    if "\nA: " not in a:
        assert got == [a, b]


def test_a_repeated_slot_must_hold_the_same_text():
    read = field_reader("{text} / {text}")
    assert read("x / x") == ["x"]
    with pytest.raises(TemplateError, match="not made by the template"):
        read("x / y")


def test_a_text_the_template_did_not_make_is_refused():
    with pytest.raises(TemplateError, match="not made by the template"):
        field_reader("{sentence} It was")("It was a fine film")


@pytest.mark.parametrize("template", ["{question1} {question2} Answer:", "{a}{b}", "{a}\n{b}", "x {a} \t {b}"])
def test_slots_with_only_whitespace_between_them_cannot_be_read_back(template):
    # "{a} {b}" filled with "New York" and "is big" reads "New York is big": no reader can tell where a
    # ends, so the template is refused when the reader is made, before any text is misread
    with pytest.raises(TemplateError, match="only whitespace between"):
        field_reader(template)


def test_every_built_in_pair_task_can_be_read_back_into_its_fields():
    from lopa.tasks.classification import GLUE
    for spec in GLUE.values():
        read = field_reader(spec.template)
        fields = ["What is it?", "What is that?"][:len(spec.columns)]
        assert read(spec.template.format(**dict(zip(spec.columns, fields)))) == fields
